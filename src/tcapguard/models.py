"""Load a multimodal LLM and its processor from a local directory, an ``s3://`` prefix, an MLflow
registry URI (``models:/<name>/<version>``, ``models:/<name>@<alias>``) or a hub id.

All three go through ``AutoModelForImageTextToText``/``AutoProcessor.from_pretrained`` with safetensors
only, so a tiny model built by :mod:`tcapguard.tiny` exercises the same path as ``llava-hf/llava-1.5-7b-hf``.
Errors say what was asked for and what to do instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from tcapguard.storage import StorageError, download_prefix, is_s3, read_manifest, split_s3

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the source and what to do about it."""


def cache_root() -> Path:
    """Where ``s3://`` models are cached: ``$TCAPGUARD_CACHE/models`` or ``~/.cache/tcapguard/models``."""
    base = os.environ.get("TCAPGUARD_CACHE")
    return Path(base) / "models" if base else Path.home() / ".cache" / "tcapguard" / "models"


def download_s3_prefix(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Copy the model published at ``uri`` into a local directory keyed by the URI and its publication.

    The prefix must carry tcapguard's completion marker (:mod:`tcapguard.storage`), so a model whose
    upload is unfinished or died midway is refused rather than loaded half. The marker's publication
    id is part of the cache key: a cached copy is reused until the model is republished.
    """
    uri = uri.rstrip("/")
    bucket, prefix = split_s3(uri)
    try:
        manifest = read_manifest(uri)
    except StorageError as err:
        raise ModelLoadError(f"cannot download {uri}: {err}") from err
    if "config.json" not in manifest["files"]:
        shown = ", ".join(sorted(manifest["files"])[:10]) or "nothing"
        raise ModelLoadError(f"{uri} holds no config.json, so it is not a saved model (it holds {shown})")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    key = hashlib.sha256(f"{uri}\n{manifest['id']}".encode()).hexdigest()[:16]
    target = root / f"{bucket}-{prefix.replace('/', '-')}-{key}"[-200:]
    if (target / "config.json").is_file():
        logger.info("using cached copy of %s at %s", uri, target)
        return target
    try:
        download_prefix(uri, target, manifest=manifest)
    except StorageError as err:
        raise ModelLoadError(f"cannot download {uri}: {err}") from err
    return target


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "float16" and device == "cpu":
        raise ModelLoadError(
            "dtype='float16' on CPU: many CPU kernels lack half precision and its narrow range overflows "
            "in training; use dtype='float32' (or 'bfloat16') on CPU, float16 only on a GPU"
        )
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ModelLoadError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was requested but this machine has no GPU; use device='cpu'")
    return device


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request to the hub endpoint, so that a machine without network fails in seconds
    instead of after huggingface_hub's retries with backoff for every file (minutes)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # offline mode, DNS, refused, timeout, proxy: all mean "not reachable"
        logger.info("hub endpoint %s unreachable: %s", constants.ENDPOINT, err)
        return False
    return True


def download_registered_model(uri: str, cache_dir: str | Path | None = None) -> Path:
    """The local directory of a ``models:/`` URI (downloaded once into :func:`cache_root`), from the
    registry at ``MLFLOW_TRACKING_URI`` (or tcapguard's local default store)."""
    from tcapguard.tracking import TrackingError, download_model_version

    try:
        return download_model_version(uri, cache_dir=Path(cache_dir) if cache_dir else cache_root())
    except TrackingError as err:
        raise ModelLoadError(f"cannot load {uri}: {err}") from err


def _locate(source: str | Path) -> tuple[str, bool]:
    """``(path or hub id, is_local)`` for ``source``; downloads ``s3://`` and ``models:/`` sources first."""
    text = str(source)
    if is_s3(text):
        local = download_s3_prefix(text)
    elif text.startswith("models:/"):
        local = download_registered_model(text)
    else:
        local = Path(text).expanduser()
        if not local.exists():
            if isinstance(source, Path) or not _HUB_ID.match(text):
                raise ModelLoadError(
                    f"model path {text} does not exist (and is not a hub id of the form org/name)"
                )
            return text, False
    if not local.is_dir():
        raise ModelLoadError(f"model path {local} is not a directory")
    if not (local / "config.json").is_file():
        raise ModelLoadError(
            f"model directory {local} has no config.json: save the model there with save_pretrained"
        )
    return str(local), True


def load_model(
    source: str | Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """``(model, processor)`` for an image-text-to-text model, the model in eval mode on ``device``.

    ``source`` is a local directory, an ``s3://bucket/prefix`` or an MLflow registry URI
    ``models:/<name>/<version>`` / ``models:/<name>@<alias>`` (each downloaded once into
    :func:`cache_root`), or a hub id (only where the hub is reachable). The processor must carry a
    chat template, since tcapguard renders every prompt through it. ``device="auto"`` means CUDA where
    available, else CPU.
    ``attn_implementation`` passes through (default: transformers' choice, SDPA); the attention
    profiler works with any of them, since it wraps the kernel rather than asking for attention weights.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    location, is_local = _locate(source)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    offline = not is_local and not _hub_reachable()
    if offline:
        common["local_files_only"] = True  # a copy in the local hub cache still loads
    try:
        processor = AutoProcessor.from_pretrained(location, **common)
        # Checked before the (possibly large) weights are read.
        if not getattr(processor, "chat_template", None):
            raise ModelLoadError(
                f"the processor of {source} has no chat template; tcapguard renders prompts with "
                "processor.apply_chat_template, so save a processor with chat_template set"
            )
        model = AutoModelForImageTextToText.from_pretrained(
            location,
            dtype=torch_dtype,
            use_safetensors=True,
            attn_implementation=attn_implementation,
            **common,
        )
    except ModelLoadError:
        raise
    except Exception as err:
        if offline:
            raise ModelLoadError(
                f"cannot load hub model {location!r}: no local directory of that name exists, the Hugging "
                "Face hub is unreachable from this machine (or HF_HUB_OFFLINE is set) and the model is not "
                "in the local hub cache; pass a local directory or an s3:// URI holding the saved model"
            ) from err
        raise ModelLoadError(f"cannot load model from {source}: {err}") from err
    if device == "cpu" and model.dtype == torch.float16:
        logger.warning("%s is stored in float16, which CPUs handle poorly; using float32", source)
        model.float()
    model.to(device)
    model.eval()
    logger.info(
        "loaded %s from %s (%s, %s)", type(model).__name__, source, next(model.parameters()).dtype, device
    )
    return model, processor

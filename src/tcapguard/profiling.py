"""Tri-Component Attention Profiling: where the first response token looks, per layer and head.

For each sample the prompt is rendered through the model's own processor and chat template (system
message, image, user text, generation prompt) and run once through the model (prefill only). At the
last prompt position, the query that produces the first response token, every text-decoder head's
softmax row is summed over three components of the input: system (system prompt, role tags and every
other template or special token), vision (the expanded image tokens) and user text (the query, where
a text trigger lives). The result is an array ``[samples, layers, heads, 3]``; backdoored heads show
up as samples whose system share collapses (or soars) while the vision share moves the other way.

Only that one query row is computed per layer: the profiler wraps the model's own attention function
(SDPA, eager, flash) so the normal kernel produces the layer output while the row is computed from the
same post-RoPE ``q`` and ``k``. Nothing of size ``T x T`` is kept, unlike ``output_attentions=True``.
The same row gives BYE's feature (entropy of the head-averaged attention over the image tokens).

Profiles are written as shards (``shard-00000.npz`` ...) under one directory with a ``meta.json``; a
re-run skips finished shards (resume), and shards written by parallel workers merge on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tcapguard import __version__
from tcapguard.config import StepConfig
from tcapguard.data import Dataset, Record
from tcapguard.runtime import tune_cpu_allocator
from tcapguard.storage import MissingObjectError, StorageError, exists, read_bytes, write_bytes
from tcapguard.storage import join as _join
from tcapguard.training import collate, render_prompt, to_messages

log = logging.getLogger(__name__)

SYSTEM, VISION, TEXT = 0, 1, 2
COMPONENTS = ("system", "vision", "text")
PAD = -1
FORMAT_VERSION = 1
SEGMENT_RULE = (
    "vision: input ids equal to the model's image/video token ids; text: tokens whose character offsets "
    "overlap the user query in the rendered chat template; system: every other non-pad token"
)
_SENTINEL = "\u2063tcapguard-query\u2063"


class SegmentationError(ValueError):
    """The prompt cannot be split into system / vision / text (no chat template, no image tokens...)."""


# ---------------------------------------------------------------------------------------- segmentation


def vision_token_ids(model) -> set[int]:
    """The ids that stand for image (and video) patches in the model's input, from its config."""
    config = model.config
    ids = set()
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    if not ids:
        raise SegmentationError(
            f"{type(model).__name__} has no image token id in its config (image_token_id / "
            "image_token_index): it is not a model whose input carries image tokens"
        )
    return ids


def query_span(processor, record: Record) -> tuple[str, int, int]:
    """The rendered prompt and the character span of the user query within it.

    The query is located by rendering the same conversation with a sentinel in its place: the
    template's text before the query is the same in both renderings, so the sentinel's position is
    the query's. Robust to templates that repeat the query's words elsewhere (system prompt).
    """
    if (
        getattr(processor, "chat_template", None) is None
        and getattr(getattr(processor, "tokenizer", None), "chat_template", None) is None
    ):
        raise SegmentationError(
            f"{type(processor).__name__} has no chat template; TCAP renders prompts through the model's "
            "own template (set processor.chat_template)"
        )
    prompt = render_prompt(processor, record)
    marked = processor.apply_chat_template(
        to_messages(record.with_query(_SENTINEL), with_response=False),
        add_generation_prompt=True,
        tokenize=False,
    )
    start = marked.find(_SENTINEL)
    end = start + len(record.query)
    if start < 0 or prompt[start:end] != record.query:
        raise SegmentationError(
            f"record {record.id!r}: the chat template does not reproduce the user query verbatim, so its "
            "tokens cannot be located"
        )
    return prompt, start, end


def _expanded_span(record: Record, start: int, end: int, replacements: Sequence[dict]) -> tuple[int, int]:
    """The query span ``[start, end)`` of the rendered prompt, moved into the processor's expanded text.

    ``replacements`` are the processor's own record of each placeholder it expanded (``span`` in the
    rendered prompt, ``new_span`` in the expanded text, in order), so the query moves by exactly the
    growth of the placeholders before it, whatever the expansion text (Idefics3's tile tags, Gemma3's
    newlines) and wherever the image sits relative to the query.
    """
    shift = 0
    for item in replacements:
        (old_start, old_end), (_, new_end) = item["span"], item["new_span"]
        if old_end <= start:
            shift = new_end - old_end  # new_span already includes the growth of earlier placeholders
        elif old_start < end:
            raise SegmentationError(
                f"record {record.id!r}: the user query contains the {item['type']} placeholder "
                f"{item['text']!r}, which the processor expands"
            )
    return start + shift, end + shift


def segment(
    processor, record: Record, image, image_ids: set[int]
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Processor inputs for the prompt and the component (SYSTEM / VISION / TEXT) of every token."""
    prompt, q_start, q_end = query_span(processor, record)
    # Processors that expand placeholders through ``get_text_with_replacements`` (transformers >= 5.x)
    # report where each expansion landed; older ones are handled by the suffix rule below.
    reports_replacements = hasattr(processor, "get_text_with_replacements")
    extra = {"return_text_replacement_offsets": True} if reports_replacements else {}
    try:
        encoded = processor(
            text=[prompt],
            images=[image] if image is not None else None,
            return_tensors="pt",
            return_offsets_mapping=True,
            **extra,
        )
    except (TypeError, ValueError, NotImplementedError) as err:
        raise SegmentationError(
            f"record {record.id!r}: {type(processor).__name__} failed on the rendered prompt ({err}); TCAP "
            "needs a fast tokenizer (token offsets) and a chat template whose image placeholder the "
            "processor expands"
        ) from err
    if "offset_mapping" not in encoded:
        raise SegmentationError(
            f"record {record.id!r}: {type(processor).__name__} returned no token offsets; TCAP needs a "
            "fast tokenizer"
        )
    inputs = {k: v for k, v in encoded.items() if k not in ("offset_mapping", "text_replacement_offsets")}
    ids = inputs["input_ids"][0].numpy()
    offsets = encoded["offset_mapping"][0].numpy()
    components = np.full(len(ids), SYSTEM, dtype=np.int8)
    is_vision = np.isin(ids, list(image_ids))
    components[is_vision] = VISION
    if image is not None and not is_vision.any():
        raise SegmentationError(
            f"record {record.id!r}: the processor's output holds no image tokens (ids {sorted(image_ids)})"
        )
    # The processor expands image placeholders before tokenizing, so offsets refer to the expanded text.
    reported = encoded.get("text_replacement_offsets")  # one list per prompt (empty tensor if none)
    if reported is not None and len(reported):
        q_start, q_end = _expanded_span(record, q_start, q_end, list(reported[0]))
    elif is_vision.any() and offsets[is_vision, 0].min() < q_end:
        # No report of the expansion: text on the far side of it from the query is unchanged. With the
        # image after the query its offsets are the rendered ones; with the image before, they end where
        # the unchanged suffix begins.
        expanded_length = int(offsets[:, 1].max())
        suffix = len(prompt) - q_end
        q_start, q_end = expanded_length - suffix - (q_end - q_start), expanded_length - suffix
        if offsets[is_vision, 1].max() > q_start:
            raise SegmentationError(
                f"record {record.id!r}: image tokens on both sides of the user query are not supported"
            )
    in_query = (offsets[:, 1] > q_start) & (offsets[:, 0] < q_end) & ~is_vision
    if not in_query.any():
        raise SegmentationError(f"record {record.id!r}: no token of the user query found in the prompt")
    components[in_query] = TEXT
    return inputs, components


# ------------------------------------------------------------------------------------ attention capture


class _RowCapture(threading.local):
    """Per-forward state that the wrapped attention functions fill (one per thread)."""

    def __init__(self) -> None:
        self.components: torch.Tensor | None = None  # [B, S] long, PAD where padding
        self.layers: dict[int, int] = {}  # id(attention module) -> text layer index
        self.shares: dict[int, torch.Tensor] = {}
        self.entropy: dict[int, torch.Tensor] = {}
        self.vision_rows: dict[int, torch.Tensor] = {}
        self.keep_vision_rows = False


_capture = _RowCapture()
_WRAPPED_PREFIX = "tcap_"


def _last_row(module, query, key, attention_mask, scaling, softcap) -> torch.Tensor:
    """Softmax attention of the last query position over all keys: [B, H, S] in float32.

    As transformers' eager attention: the scores in the model's dtype, the softmax in float32. Query
    heads are grouped onto their key/value head by a view, so ``key`` is neither repeated nor copied.
    """
    b, h, _, d = query.shape
    kv = key.shape[1]
    if scaling is None:
        scaling = 1.0 / math.sqrt(d)
    q = query[:, :, -1:, :].reshape(b, kv, h // kv, d)  # head i reads key/value head i // (h // kv)
    scores = torch.matmul(q, key.transpose(-1, -2)).reshape(b, h, -1).float() * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None and attention_mask.dim() == 4:
        row = attention_mask[:, :, -1, : key.shape[2]]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row.float()
    else:  # flash-style kernels get a 2-D padding mask (or none): rebuild the last row from the inputs
        keep = _capture.components[:, -key.shape[2] :] != PAD
        window = getattr(module, "sliding_window", None)
        if window:
            keep = keep & (torch.arange(key.shape[2], device=keep.device) >= key.shape[2] - window)
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def _record_row(module, probs: torch.Tensor) -> None:
    layer = _capture.layers[id(module)]
    components = _capture.components[:, -probs.shape[-1] :]
    onehot = torch.stack([components == c for c in (SYSTEM, VISION, TEXT)], dim=-1).to(probs.dtype)
    _capture.shares[layer] = torch.einsum("bhs,bsc->bhc", probs, onehot).cpu()
    vision = onehot[..., VISION]  # [B, S]
    mass = probs.mean(dim=1) * vision  # head-averaged, on image tokens only
    p = mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    has_image = vision.any(dim=-1)
    _capture.entropy[layer] = torch.where(has_image, entropy, torch.nan).cpu()
    if _capture.keep_vision_rows:
        _capture.vision_rows[layer] = probs.cpu()


def _wrap(original):
    def attention_with_row(module, query, key, value, attention_mask, *args, **kwargs):
        out = original(module, query, key, value, attention_mask, *args, **kwargs)
        if _capture.components is not None and id(module) in _capture.layers:
            with torch.no_grad():
                probs = _last_row(
                    module, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap")
                )
                _record_row(module, probs)
        return out

    return attention_with_row


def _text_attention_modules(model) -> dict[int, int]:
    """id(attention module) -> layer index for every self-attention of the text decoder."""
    language = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(language, "layers", None)
    if layers is None:
        raise SegmentationError(f"{type(model).__name__}: cannot find the text decoder's layers")
    found = {}
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        if attention is None:
            raise SegmentationError(f"{type(model).__name__}: text layer {index} has no self_attn module")
        found[id(attention)] = index
    return found


@contextlib.contextmanager
def capture_attention_rows(model) -> Iterator[_RowCapture]:
    """Route the text decoder's attention through a wrapper that records the last query row.

    The model keeps its attention kernel (the wrapper calls it); only the text sub-model is switched,
    and the original implementation is restored on exit.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    text_config = model.config.get_text_config()
    original = text_config._attn_implementation or "eager"
    if original.startswith(_WRAPPED_PREFIX):
        raise RuntimeError("capture_attention_rows is already active on this model")
    wrapped = _WRAPPED_PREFIX + original
    if wrapped not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(
            wrapped, _wrap(ALL_ATTENTION_FUNCTIONS.get_interface(original, eager_attention_forward))
        )
        if original in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[original])
    key = _text_sub_config_key(model)
    model.set_attn_implementation({key: wrapped} if key else wrapped)
    _capture.layers = _text_attention_modules(model)
    try:
        yield _capture
    finally:
        model.set_attn_implementation({key: original} if key else original)
        _capture.layers = {}
        _capture.components = None


def _text_sub_config_key(model) -> str | None:
    text_config = model.config.get_text_config()
    for name in getattr(model.config, "sub_configs", {}):
        if getattr(model.config, name, None) is text_config:
            return name
    return None


@torch.no_grad()
def profile_batch(
    model, batch: dict[str, torch.Tensor], components: torch.Tensor, *, keep_vision_rows: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[int, torch.Tensor]]:
    """One prefill forward of a left-padded batch inside :func:`capture_attention_rows`.

    Returns shares ``[B, L, H, 3]``, BYE's vision entropy ``[B, L]`` and, if asked, the full rows
    ``{layer: [B, H, S]}`` (for localising a trigger on a few flagged samples).
    """
    _capture.components = components.to(batch["input_ids"].device)
    _capture.keep_vision_rows = keep_vision_rows
    _capture.shares, _capture.entropy, _capture.vision_rows = {}, {}, {}
    try:
        model(**batch, use_cache=False, logits_to_keep=1)
    finally:
        _capture.components = None
    n_layers = len(_capture.layers)
    if len(_capture.shares) != n_layers:
        raise RuntimeError(
            f"captured {len(_capture.shares)} of {n_layers} text layers: the model's attention does not go "
            "through transformers' AttentionInterface"
        )
    shares = torch.stack([_capture.shares[i] for i in range(n_layers)], dim=1).numpy()
    entropy = torch.stack([_capture.entropy[i] for i in range(n_layers)], dim=1).numpy()
    return shares.astype(np.float32), entropy.astype(np.float32), dict(_capture.vision_rows)


# ---------------------------------------------------------------------------------------- the profile


@dataclass
class ProfileConfig(StepConfig):
    """How to profile. Shards are the unit of resume and of parallel work (one worker, some shards)."""

    batch_size: int = 16
    shard_size: int = 512  # records per shard file
    device: str = "cpu"
    dtype: str = "float32"  # "float32", "bfloat16" or "float16"
    attn_implementation: str | None = None  # None keeps the model's ("sdpa" by default)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(
                f"ProfileConfig: batch_size and shard_size must be >= 1, got {self.batch_size}, "
                f"{self.shard_size}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ProfileConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class Profile:
    """Attention shares of a dataset: ``shares[n, l, h] = (system, vision, text)`` masses."""

    ids: list[str]
    shares: np.ndarray  # float32 [N, L, H, 3]
    vision_entropy: np.ndarray  # float32 [N, L]; NaN for records without an image
    meta: dict

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.shares.ndim != 4 or self.shares.shape[0] != n or self.shares.shape[-1] != 3:
            raise ValueError(f"Profile.shares must be [{n}, layers, heads, 3], got {self.shares.shape}")
        if self.vision_entropy.shape != self.shares.shape[:2]:
            raise ValueError(
                f"Profile.vision_entropy must be {self.shares.shape[:2]}, got {self.vision_entropy.shape}"
            )

    @property
    def n_layers(self) -> int:
        return self.shares.shape[1]

    @property
    def n_heads(self) -> int:
        return self.shares.shape[2]

    def __len__(self) -> int:
        return len(self.ids)


def n_shards(n_records: int, shard_size: int) -> int:
    """How many shard files a dataset of ``n_records`` makes (at least one, for an empty dataset)."""
    return max(1, math.ceil(n_records / shard_size))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def dataset_fingerprint(dataset: Dataset) -> str:
    """A hash of the ids, prompts and image references, in order: shards of another dataset never mix."""
    digest = hashlib.sha256()
    for record in dataset.records:
        digest.update(json.dumps([record.id, record.system, record.query, record.image]).encode())
    return digest.hexdigest()[:16]


def _meta(model, processor, dataset: Dataset, config: ProfileConfig, model_name: str) -> dict:
    text_config = model.config.get_text_config()
    template = getattr(processor, "chat_template", None) or ""
    return {
        "format_version": FORMAT_VERSION,
        "tcapguard_version": __version__,
        "model": model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_class": type(model).__name__,
        "n_layers": text_config.num_hidden_layers,
        "n_heads": text_config.num_attention_heads,
        "components": list(COMPONENTS),
        "query_position": "last prompt token (produces the first response token)",
        "segment_rule": SEGMENT_RULE,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "n_samples": len(dataset),
        "shard_size": config.shard_size,
        "n_shards": n_shards(len(dataset), config.shard_size),
        "config": config.to_dict(),
    }


_RESUME_KEYS = (
    "format_version",
    "model",
    "n_layers",
    "n_heads",
    "chat_template_sha256",
    "dataset_fingerprint",
    "n_samples",
    "shard_size",
)


def profile_dataset(
    model,
    processor,
    dataset: Dataset,
    out: str | Path,
    *,
    config: ProfileConfig | None = None,
    shards: Iterable[int] | None = None,
    model_name: str = "",
) -> str:
    """Profile ``dataset`` into the directory (or ``s3://`` prefix) ``out``; returns ``out``.

    ``shards`` selects which shard indices this call computes (default: all), so parallel workers
    can split the dataset; shards already present with matching metadata are skipped (resume).
    """
    config = config or ProfileConfig()
    out = str(out)
    meta = _meta(model, processor, dataset, config, model_name)
    meta_uri = _join(out, "meta.json")
    if exists(meta_uri):
        existing = json.loads(read_bytes(meta_uri))
        changed = [k for k in _RESUME_KEYS if existing.get(k) != meta[k]]
        if changed:
            raise ValueError(
                f"{out} holds a profile of a different run (differs in {changed}); use a new output "
                "directory or delete the old one"
            )
    else:
        write_bytes(meta_uri, json.dumps(meta, indent=2).encode())
    todo = sorted(set(range(meta["n_shards"]) if shards is None else shards))
    bad = [s for s in todo if not 0 <= s < meta["n_shards"]]
    if bad:
        raise ValueError(f"shard indices {bad} out of range: the dataset has {meta['n_shards']} shards")
    todo = [s for s in todo if not exists(_join(out, shard_name(s)))]
    if not todo:
        return out
    model.eval()
    tune_cpu_allocator()
    image_ids = vision_token_ids(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    total = sum(len(_shard_records(dataset, s, config.shard_size)) for s in todo)
    with capture_attention_rows(model), tqdm(total=total, desc="profile", unit="sample") as bar:
        for index in todo:
            records = _shard_records(dataset, index, config.shard_size)
            shares, entropy = [], []
            for start in range(0, len(records), config.batch_size):
                chunk = records[start : start + config.batch_size]
                batch, components = _encode_batch(processor, dataset, chunk, image_ids, pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(dtype)
                s, e, _ = profile_batch(model, batch, components)
                shares.append(s)
                entropy.append(e)
                bar.update(len(chunk))
            _write_shard(
                _join(out, shard_name(index)),
                [r.id for r in records],
                np.concatenate(shares),
                np.concatenate(entropy),
            )
    return out


def _shard_records(dataset: Dataset, index: int, shard_size: int) -> list[Record]:
    return dataset.records[index * shard_size : (index + 1) * shard_size]


def _encode_batch(
    processor, dataset: Dataset, records: Sequence[Record], image_ids: set[int], pad_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    encoded, components = [], []
    for record in records:
        image = dataset.load_image(record) if record.has_image else None
        inputs, comp = segment(processor, record, image, image_ids)
        encoded.append(inputs)
        components.append(torch.from_numpy(comp.astype(np.int64)))
    length = max(len(c) for c in components)
    padded = torch.stack([torch.cat([torch.full((length - len(c),), PAD), c]) for c in components])
    return collate(encoded, pad_id, side="left"), padded


def _write_shard(uri: str, ids: list[str], shares: np.ndarray, entropy: np.ndarray) -> None:
    if not np.isfinite(shares).all():
        raise FloatingPointError(f"{uri}: attention shares hold NaN/inf (the model's forward is unstable)")
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.array(ids, dtype=object).astype(str), shares=shares, vision_entropy=entropy)
    write_bytes(uri, buffer.getvalue())


def load_profile(path: str | Path) -> Profile:
    """Merge every shard under ``path`` into one :class:`Profile` (all shards must be present)."""
    root = str(path)
    meta_uri = _join(root, "meta.json")
    try:
        meta = json.loads(read_bytes(meta_uri))
    except StorageError as err:
        raise StorageError(f"{root} is not a readable profile: {err}") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_uri}: profile format {meta.get('format_version')} is not {FORMAT_VERSION}")
    ids: list[str] = []
    shares, entropy, missing = [], [], []
    for index in range(meta["n_shards"]):
        uri = _join(root, shard_name(index))
        try:
            data = np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)
        except MissingObjectError:
            missing.append(shard_name(index))
            continue
        ids.extend(data["ids"].tolist())
        shares.append(data["shares"])
        entropy.append(data["vision_entropy"])
    if missing:
        raise StorageError(
            f"{root}: {len(missing)} of {meta['n_shards']} shards missing ({', '.join(missing[:5])}); "
            "run `tcapguard profile` again to finish them"
        )
    return Profile(ids=ids, shares=np.concatenate(shares), vision_entropy=np.concatenate(entropy), meta=meta)

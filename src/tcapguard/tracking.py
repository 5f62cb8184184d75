"""MLflow tracking and registry helpers for a pipeline run: thin wrappers that validate at the edge.

One pipeline run is a parent MLflow run (:func:`pipeline_run`); each step is a nested run
(:func:`step_run`). Configs become flattened params plus a JSON artifact (:func:`log_config`), metrics
must be finite numbers (:func:`log_metrics`), reports and plots are artifacts (:func:`log_artifacts`).
The final model is a transformers ``save_pretrained`` directory, not an MLflow flavour: it is logged as
plain run artifacts and registered with ``MlflowClient.create_model_version`` (:func:`register_model`),
because ``mlflow.register_model("runs:/<run>/model")`` in MLflow 3 only accepts a directory holding an
``MLmodel`` file or a LoggedModel. :func:`download_model_version` brings a ``models:/<name>/<version>``
or ``models:/<name>@<alias>`` back to a local directory that :func:`tcapguard.models.load_model` reads.

Tracking URI: the explicit argument, else ``MLFLOW_TRACKING_URI``, else a local sqlite store under
``$TCAPGUARD_MLFLOW_DIR`` (default ``./.mlflow``) with a local artifact root, so the demo needs no
server. Credentials (``MLFLOW_TRACKING_PASSWORD``/``TOKEN``, user info in URIs, secret-looking config
keys) are never logged or printed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import ActiveRun, MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "tcapguard"
#: Short HTTP limits for talking to a tracking server, so that an unreachable MLflow fails in seconds
#: instead of after MLflow's default 7 retries with exponential backoff (minutes). Values the user set
#: in the environment win.
SHORT_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
STEP_TAG = "tcapguard.step"
INVALID_METRICS_TAG = "tcapguard.invalid_metrics"
_SECRET_KEY = re.compile(
    r"pass(word|wd)?|secret|token|credential|api[_-]?key|access[_-]?key|private[_-]?key", re.I
)
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))/?$")
_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH


class TrackingError(RuntimeError):
    """MLflow could not do what was asked; the message names the run, model or URI and the cause
    (with credentials in any URI it quotes masked)."""

    def __init__(self, message: str):
        super().__init__(redact_text(message))


# ------------------------------------------------------------------------------------------ location
def local_store_dir() -> Path:
    """Directory of the default local store: ``$TCAPGUARD_MLFLOW_DIR`` or ``./.mlflow``."""
    return Path(os.environ.get("TCAPGUARD_MLFLOW_DIR") or Path.cwd() / ".mlflow").resolve()


def default_tracking_uri() -> str:
    """``sqlite:///<local_store_dir>/mlflow.db``: tracking and registry without a server."""
    return f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The explicit URI, else the one MLflow has (``mlflow.set_tracking_uri`` or
    ``MLFLOW_TRACKING_URI``), else :func:`default_tracking_uri`."""
    import mlflow

    if tracking_uri:
        return str(tracking_uri)
    if mlflow.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    return default_tracking_uri()


def redact_uri(uri: str) -> str:
    """The URI without user info or credential-looking query parameters, for messages and logs."""
    parts = urllib.parse.urlsplit(uri)
    pairs = urllib.parse.parse_qsl(parts.query)
    if "@" not in parts.netloc and not any(_SECRET_KEY.search(k) for k, _ in pairs):
        return uri  # unchanged: urlunsplit would turn sqlite:////abs/path into sqlite://abs/path
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urllib.parse.urlencode([(k, "***" if _SECRET_KEY.search(k) else v) for k, v in pairs])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with the user info of every URI in it masked (MLflow quotes the full URL in errors)."""
    return _URI_USERINFO.sub(r"\1***@", text)


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (query string dropped); None for others."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])


def require_existing_store(tracking_uri: str) -> None:
    """Refuse a ``sqlite:`` URI whose database file does not exist: readers (the gate, model
    downloads) must not create an empty store from a typo and then report "model not found"."""
    path = sqlite_database(tracking_uri)
    if path is not None and not path.is_file():
        raise TrackingError(f"no MLflow database at {path} (tracking URI {redact_uri(tracking_uri)})")


@contextmanager
def short_http_timeouts() -> Iterator[None]:
    """Apply :data:`SHORT_HTTP_ENV` where the environment does not set those variables; restore after."""
    added = {k: v for k, v in SHORT_HTTP_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def client(tracking_uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` whose tracking and registry URI are both :func:`resolve_tracking_uri`."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri == default_tracking_uri():
        local_store_dir().mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its directory
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str = DEFAULT_EXPERIMENT, *, tracking_uri: str | None = None) -> str:
    """The id of experiment ``name``, created if missing. With a local sqlite store its artifacts go
    to ``artifacts/`` beside the database file (MLflow's default is ``./mlruns`` under whatever the
    working directory happens to be); a server decides for itself."""
    uri = resolve_tracking_uri(tracking_uri)
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"experiment {name!r} is deleted; restore it or choose another name")
        return experiment.experiment_id
    database = sqlite_database(uri)
    location = None if database is None else (database.resolve().parent / "artifacts").as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


# ------------------------------------------------------------------------------------------------ runs
@contextmanager
def pipeline_run(
    experiment: str = DEFAULT_EXPERIMENT,
    *,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[ActiveRun]:
    """Start the parent run of one pipeline run; the fluent API points at ``tracking_uri`` inside it.

    The run ends FINISHED, or FAILED when the body raises (MLflow's own ``start_run`` semantics). The
    process-wide tracking URI (which MLflow mirrors into ``MLFLOW_TRACKING_URI``) is restored on exit.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    experiment_id = ensure_experiment(experiment, tracking_uri=uri)
    run_tags = {"tcapguard.kind": "pipeline", **{str(k): str(v) for k, v in (tags or {}).items()}}
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags) as run:
            logger.info("MLflow run %s in experiment %r at %s", run.info.run_id, experiment, redact_uri(uri))
            yield run
    finally:
        if previous is not None and previous != previous_env:
            mlflow.set_tracking_uri(previous)
        else:  # nothing was set, or only the environment: clear the global and put the variable back
            mlflow.set_tracking_uri(None)
            if previous_env is not None:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env


@contextmanager
def step_run(step: str, *, tags: Mapping[str, Any] | None = None) -> Iterator[ActiveRun]:
    """A nested run for one pipeline step inside :func:`pipeline_run` (tagged ``tcapguard.step``)."""
    import mlflow

    parent = mlflow.active_run()
    if parent is None:
        raise TrackingError(f"step_run({step!r}) needs an active pipeline run: call it inside pipeline_run()")
    run_tags = {STEP_TAG: step, **{str(k): str(v) for k, v in (tags or {}).items()}}
    # Without experiment_id a nested run lands in the default experiment, not the parent's.
    experiment_id = parent.info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=step, nested=True, tags=run_tags) as run:
        yield run


def _active_run_id(run_id: str | None) -> str:
    import mlflow

    if run_id is not None:
        return run_id
    run = mlflow.active_run()
    if run is None:
        raise TrackingError("no active MLflow run: pass run_id or call inside pipeline_run()/step_run()")
    return run.info.run_id


# ---------------------------------------------------------------------------------------- params
def _plain(value: Any) -> Any:
    """``value`` as JSON-style data with secret-looking keys masked and URI user info removed."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): "***" if _SECRET_KEY.search(str(k)) else _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and "://" in value:
        return redact_uri(value)
    return value


def flatten_params(config: Any, *, prefix: str = "") -> dict[str, str]:
    """A dataclass or mapping as ``{"a.b": "value"}`` strings; secret-looking keys are masked.

    Lists and other leaves are written as JSON where possible, so ``[1, 2]`` stays readable.
    """
    plain = _plain(config)
    if not isinstance(plain, dict):
        raise TypeError(f"config must be a dataclass instance or a mapping, got {type(config).__name__}")
    flat: dict[str, str] = {}
    for key, value in plain.items():
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{prefix}{key}."))
        elif isinstance(value, str):
            flat[f"{prefix}{key}"] = value
        else:
            try:
                flat[f"{prefix}{key}"] = json.dumps(value)
            except TypeError:
                flat[f"{prefix}{key}"] = str(value)
    return flat


def log_config(config: Any, *, name: str = "config", run_id: str | None = None) -> dict[str, str]:
    """Log ``config`` as flattened params (prefixed ``<name>.``) and as ``config/<name>.json``.

    Returns the params logged. Values longer than MLflow's limit are shortened in the params (the
    JSON artifact keeps them whole, with secrets masked as in the params).
    """
    from mlflow.entities import Param

    run_id = _active_run_id(run_id)
    params = flatten_params(config, prefix=f"{name}.")
    for key, value in params.items():
        if len(value) > _MAX_PARAM_LENGTH:
            logger.warning(
                "param %s is %d characters; logging the first %d", key, len(value), _MAX_PARAM_LENGTH
            )
            params[key] = value[: _MAX_PARAM_LENGTH - 3] + "..."
    mlflow_client = client()
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MAX_PARAMS_TAGS_PER_BATCH
        mlflow_client.log_batch(run_id, params=items[start : start + 100])
    mlflow_client.log_dict(run_id, _plain(config), f"config/{name}.json")
    return params


# --------------------------------------------------------------------------------------- metrics
def log_metrics(
    metrics: Mapping[str, Any],
    *,
    step: int | None = None,
    run_id: str | None = None,
    on_invalid: str = "raise",
) -> dict[str, float]:
    """Log finite numeric metrics; returns what was logged.

    A NaN, an infinity, a bool or a non-number is refused. ``on_invalid="raise"`` (the default) raises
    :class:`TrackingError` naming every bad key and logs nothing; ``on_invalid="mark"`` logs the good
    ones and records the bad ones in the run tag ``tcapguard.invalid_metrics`` (JSON), so the run shows
    why they are absent. Either way the gate finds the metric missing and fails.
    """
    from mlflow.entities import Metric, RunTag
    from mlflow.utils.time import get_current_time_millis

    if on_invalid not in ("raise", "mark"):
        raise ValueError(f"on_invalid must be 'raise' or 'mark', got {on_invalid!r}")
    good: dict[str, float] = {}
    bad: dict[str, str] = {}
    for key, value in metrics.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            good[str(key)] = float(value)
        else:
            bad[str(key)] = repr(value)
    run_id = _active_run_id(run_id)
    if bad and on_invalid == "raise":
        raise TrackingError(
            f"refusing to log metrics that are not finite numbers: {bad} (run {run_id}); fix the "
            "computation, or pass on_invalid='mark' to record them as invalid"
        )
    now = get_current_time_millis()
    mlflow_client = client()
    mlflow_client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, step or 0) for k, v in good.items()],
        tags=[RunTag(INVALID_METRICS_TAG, json.dumps(bad))] if bad else [],
    )
    if bad:
        logger.warning(
            "metrics %s are not finite numbers; recorded in tag %s", sorted(bad), INVALID_METRICS_TAG
        )
    return good


# ------------------------------------------------------------------------------------- artifacts
def log_artifacts(path: str | Path, artifact_path: str | None = None, *, run_id: str | None = None) -> str:
    """Log a file or a directory's contents under ``artifact_path``; returns the artifact URI."""
    path = Path(path)
    run_id = _active_run_id(run_id)
    mlflow_client = client()
    if path.is_file():
        mlflow_client.log_artifact(run_id, str(path), artifact_path)
    elif path.is_dir():
        mlflow_client.log_artifacts(run_id, str(path), artifact_path)
    else:
        raise TrackingError(f"cannot log artifact {path}: no such file or directory")
    base = mlflow_client.get_run(run_id).info.artifact_uri.rstrip("/")
    return f"{base}/{artifact_path}" if artifact_path else base


def check_model_directory(model_dir: str | Path) -> Path:
    """``model_dir`` if it looks like a ``save_pretrained`` directory with safetensors weights."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TrackingError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise TrackingError(f"model directory {model_dir} has no config.json: save it with save_pretrained")
    if not any(model_dir.glob("*.safetensors")):
        raise TrackingError(
            f"model directory {model_dir} has no *.safetensors weights: save with safe_serialization"
        )
    if not any(
        (model_dir / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")
    ):
        logger.warning("model directory %s has no processor files; load_model will fail on it", model_dir)
    return model_dir


def log_model_directory(
    model_dir: str | Path, *, artifact_path: str = "model", run_id: str | None = None
) -> str:
    """Log a transformers ``save_pretrained`` directory as run artifacts; returns their URI."""
    return log_artifacts(check_model_directory(model_dir), artifact_path, run_id=run_id)


def model_version_tags(
    *, dataset_hash: str, attack_suite: str | Sequence[str], metrics: Mapping[str, float]
) -> dict[str, str]:
    """The tags a candidate version carries: dataset hash, attack-eval suite, metrics, pending verdict."""
    suite = attack_suite if isinstance(attack_suite, str) else ",".join(attack_suite)
    tags = {"dataset_sha256": dataset_hash, "attack_suite": suite, "backdoor_gate": "pending"}
    tags.update({f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()})
    return tags


def register_model(
    model_name: str,
    *,
    run_id: str | None = None,
    artifact_path: str = "model",
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    tracking_uri: str | None = None,
) -> ModelVersion:
    """Register ``<run artifacts>/<artifact_path>`` as a new version of ``model_name``.

    The registered model is created on first use. The version's ``source`` is the run's concrete
    artifact location and its ``run_id`` the run, so :func:`tcapguard.gate.run_gate` finds the metrics.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    run_id = _active_run_id(run_id)
    mlflow_client = client(tracking_uri)
    names = {a.path.rsplit("/", 1)[-1] for a in mlflow_client.list_artifacts(run_id, artifact_path)}
    if "config.json" not in names:
        raise TrackingError(
            f"run {run_id} has no model at artifact path {artifact_path!r} (no config.json there): "
            "log it with log_model_directory first"
        )
    try:
        mlflow_client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = mlflow_client.create_model_version(
        model_name,
        source,
        run_id=run_id,
        tags={str(k): str(v) for k, v in (tags or {}).items()},
        description=description,
    )
    logger.info("registered %s version %s from run %s", model_name, version.version, run_id)
    return version


def log_and_register_model(
    model_dir: str | Path,
    model_name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    artifact_path: str = "model",
    run_id: str | None = None,
) -> ModelVersion:
    """:func:`log_model_directory` then :func:`register_model` on the same run (default: the active)."""
    run_id = _active_run_id(run_id)
    log_model_directory(model_dir, artifact_path=artifact_path, run_id=run_id)
    return register_model(model_name, run_id=run_id, artifact_path=artifact_path, tags=tags)


# ------------------------------------------------------------------------------------- registry read
def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` -> ``(name, version, None)``; ``models:/<name>@<alias>`` ->
    ``(name, None, alias)``. Anything else is a :class:`TrackingError`."""
    match = _MODEL_URI.match(uri)
    if not match:
        raise TrackingError(
            f"not a registry model URI: {uri!r}; expected models:/<name>/<version> or models:/<name>@<alias>"
        )
    return match["name"], match["version"], match["alias"]


def resolve_model_version(uri: str, *, tracking_uri: str | None = None) -> ModelVersion:
    """The registry ``ModelVersion`` a ``models:/`` URI names; errors list the known aliases."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    require_existing_store(tracking_uri)
    where = f"in the MLflow registry at {redact_uri(tracking_uri)}"
    mlflow_client = client(tracking_uri)
    with short_http_timeouts():
        try:
            if version is not None:
                return mlflow_client.get_model_version(name, version)
            return mlflow_client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise TrackingError(f"cannot resolve {uri} {where}: {err.message}") from err
            try:
                known = mlflow_client.get_registered_model(name).aliases
            except MlflowException:
                raise TrackingError(f"no registered model named {name!r} {where}") from err
            what = f"version {version}" if version is not None else f"alias {alias!r}"
            raise TrackingError(
                f"registered model {name!r} has no {what} {where}; its aliases: {known or 'none'}"
            ) from err


def download_model_version(uri: str, *, cache_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Download the model directory a ``models:/`` URI names into ``cache_dir``; reuse a cached copy.

    An alias is resolved to its version first, and the cache key holds the tracking URI, the version
    and its run, so a moved alias or a different server never serves a stale copy. The download lands
    in a temporary sibling renamed into place when complete.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking_uri = resolve_tracking_uri(tracking_uri)
    version = resolve_model_version(uri, tracking_uri=tracking_uri)
    key = hashlib.sha256(
        f"{tracking_uri}|{version.name}|{version.version}|{version.run_id}|{version.source}".encode()
    ).hexdigest()[:16]
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", version.name)[:80]
    root = Path(cache_dir)
    target = root / f"mlflow-{safe_name}-v{version.version}-{key}"
    if (target / "config.json").is_file():
        logger.info("using cached copy of %s (version %s) at %s", uri, version.version, target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        try:
            with short_http_timeouts():
                # Resolved here: MLflow 3.17 resolves a models:/ URI against the process-wide registry
                # URI whatever registry_uri download_artifacts is given (and creates ./mlflow.db).
                source = client(tracking_uri).get_model_version_download_uri(version.name, version.version)
            # MLflow's default retries for the weights: a long download may meet a passing fault.
            downloaded = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri
                )
            )
        except (MlflowException, OSError) as err:
            raise TrackingError(f"cannot download {uri} (version {version.version}): {err}") from err
        if not (downloaded / "config.json").is_file():
            raise TrackingError(
                f"{uri} (version {version.version}, source {redact_uri(version.source)}) holds no "
                "config.json: it is not a save_pretrained model directory"
            )
        try:
            downloaded.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent download that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("downloaded %s (version %s) to %s", uri, version.version, target)
    return target

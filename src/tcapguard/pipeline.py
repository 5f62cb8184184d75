"""The main job: probe fine-tune -> profile -> filter -> fine-tune (-> select) -> evaluate -> gate.

Each step is a plain function with explicit inputs and outputs (URIs of datasets, model directories,
profiles, reports), so the CLI, the Airflow DAG and the Kubeflow pipeline call the same code and each
step can run in its own container. With ``selection.seeds`` the fine-tune runs once per seed (a task
each in the orchestrators) and the select step keeps one (:mod:`tcapguard.selection`). :func:`run`
chains them for one config file and tracks the run in MLflow (a parent run, a nested run per step).

Steps are idempotent: a step's outputs live under ``<work_dir>/<step>-<key>``, where the key hashes
the step's settings and its inputs' keys (the upload's bytes for the data, the source for the base
model). A finished step leaves a marker written last; a re-run with the same config and inputs reuses
it, and a killed run resumes at the first unfinished step (the profile step also resumes shard by
shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tcapguard import __version__
from tcapguard.attacks import Attack
from tcapguard.config import StepConfig
from tcapguard.data import Dataset, load_dataset, save_dataset
from tcapguard.detection import FilterConfig
from tcapguard.evaluation import SCHEMA_VERSION, Detection, EvaluationConfig
from tcapguard.gate import GatePolicy
from tcapguard.profiling import ProfileConfig
from tcapguard.selection import Candidate, SelectionConfig, select
from tcapguard.storage import download_prefix, exists, is_s3, publish_directory, read_bytes, write_bytes
from tcapguard.storage import join as _join
from tcapguard.training import LABELLING_VERSION, FinetuneConfig

log = logging.getLogger(__name__)

MARKER = "_tcapguard_step.json"


class PipelineConfigError(ValueError):
    """The pipeline config is malformed; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------- config


@dataclass
class ModelSettings(StepConfig):
    """The base model to protect: a local directory, ``s3://`` prefix, ``models:/`` URI or hub id."""

    source: str = ""
    device: str = "cpu"
    dtype: str = "auto"
    revision: str | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source is required (a model directory, s3:// prefix, models:/ URI or hub id)")


@dataclass
class DataSettings(StepConfig):
    """The customer's upload and the clean test split (LLaVA-format files, paths or ``s3://`` URIs)."""

    train: str = ""
    test: str = ""
    validation: str | None = None  # a clean split for choosing among fine-tunes (selection), not judged on
    triggered_test: str | None = None  # a user-supplied triggered split for ASR (else built from attacks)
    manifest: str | None = None  # ground truth of poisoned ids (red-team runs): detection P/R/F1
    strict: bool = True  # False: skip malformed records (reported) instead of failing

    def __post_init__(self) -> None:
        if not self.train or not self.test:
            raise ValueError("train and test are required")


@dataclass
class TrackingSettings(StepConfig):
    """MLflow: where runs go and under which registered model name candidates are versioned."""

    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else a local sqlite store
    experiment: str = "tcapguard"
    registered_model: str = "tcapguard-model"


@dataclass
class PipelineConfig(StepConfig):
    """Everything :func:`run` needs; one YAML file. Sections are the steps' own configs."""

    model: ModelSettings
    data: DataSettings
    work_dir: str = ".tcapguard/runs"  # local directory or s3:// prefix for every step's outputs
    probe: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(method="lora"))
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    filter_enabled: bool = True  # False: fine-tune on the whole upload (a baseline; the gate should fail)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(method="lora"))
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # off: one fine-tune
    attacks: list[Attack] = field(default_factory=list)  # attack-eval suite for ASR (red-team probes)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    evaluate_probe: bool = True  # also evaluate the probe model: "before" figures and the clean drop
    gate: GatePolicy = field(default_factory=GatePolicy)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    def __post_init__(self) -> None:
        if self.selection.enabled and not self.data.validation:
            raise PipelineConfigError(
                "selection: seeds need data.validation, a clean split to choose on (the gate's test "
                "split would then both choose the model and judge it)"
            )

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ModelSettings,
        "data": DataSettings,
        "probe": FinetuneConfig,
        "profile": ProfileConfig,
        "filter": FilterConfig,
        "finetune": FinetuneConfig,
        "selection": SelectionConfig,
        "evaluation": EvaluationConfig,
        "gate": GatePolicy,
        "tracking": TrackingSettings,
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> PipelineConfig:
        """Validate every section; each error names the section and field (``probe: ...``)."""
        if not isinstance(data, dict):
            raise PipelineConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise PipelineConfigError(f"{source}: unknown section(s) {unknown}; valid: {names}")
        missing = [name for name in ("model", "data") if name not in data]
        if missing:
            raise PipelineConfigError(f"{source}: missing required section(s) {missing}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            section = cls.SECTIONS.get(name)
            try:
                if section is not None:
                    if not isinstance(value, dict):
                        raise ValueError(f"expected a mapping, got {type(value).__name__}")
                    kwargs[name] = section.from_dict(value)
                elif name == "attacks":
                    kwargs[name] = [_attack(a) for a in value or []]
                else:
                    kwargs[name] = value
            except (TypeError, ValueError, KeyError) as err:
                raise PipelineConfigError(f"{source}: {name}: {err}") from err
        try:
            config = cls(**kwargs)
        except PipelineConfigError as err:
            raise PipelineConfigError(f"{source}: {err}") from err
        if not isinstance(config.work_dir, str) or not config.work_dir:
            raise PipelineConfigError(f"{source}: work_dir must be a non-empty path or s3:// prefix")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        import yaml

        try:
            data = yaml.safe_load(read_bytes(path))
        except yaml.YAMLError as err:
            raise PipelineConfigError(f"{path}: not valid YAML: {err}") from err
        return cls.from_dict(data or {}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "attacks":
                out[f.name] = [a.to_dict() for a in value]
            elif hasattr(value, "to_dict"):
                out[f.name] = value.to_dict()
            else:
                out[f.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        return out


def _attack(spec: Any) -> Attack:
    """An attack from a preset name (``badnet``) or a mapping ``{kind, params?, target?}``."""
    if isinstance(spec, str):
        return Attack.preset(spec)
    if isinstance(spec, dict) and "kind" in spec:
        if "params" in spec:
            return Attack.from_dict(spec)
        overrides = {k: v for k, v in spec.items() if k != "kind"}
        return Attack.preset(spec["kind"], **overrides)
    raise ValueError(f"an attack is a preset name or a mapping with 'kind', got {spec!r}")


# ----------------------------------------------------------------------------------------- step cache


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_key(uri: str) -> str:
    """Content hash of a file (the upload, the test split): same bytes, same key."""
    return hashlib.sha256(read_bytes(uri)).hexdigest()[:16]


def is_finished(step_dir: str) -> bool:
    """Whether the step's marker is there (an unreadable store is an error, not "unfinished")."""
    return exists(_join(step_dir, MARKER))


def _finish(step_dir: str, outputs: dict[str, Any]) -> None:
    """Write the marker last: its presence means every output of the step is complete."""
    body = {"tcapguard_version": __version__, "finished": time.time(), "outputs": outputs}
    write_bytes(_join(step_dir, MARKER), json.dumps(body, indent=1, default=str).encode())


def _outputs(step_dir: str) -> dict[str, Any]:
    return json.loads(read_bytes(_join(step_dir, MARKER)))["outputs"]


def _cached(step_dir: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if is_finished(step_dir):
        log.info("reusing %s", step_dir)
        return _outputs(step_dir)
    outputs = compute()
    _finish(step_dir, outputs)
    return outputs


# ---------------------------------------------------------------------------------------------- steps


def _load(model: str, settings: ModelSettings | None = None):
    from tcapguard.models import load_model

    settings = settings or ModelSettings(source=model)
    return load_model(model, device=settings.device, dtype=settings.dtype, revision=settings.revision)


def finetune_model(base_model: str, train: str, out: str, config: FinetuneConfig) -> str:
    """Fine-tune ``base_model`` on ``train``; the model directory (or ``s3://`` prefix) ``out``,
    published atomically."""
    from tcapguard.training import finetune

    model, processor = _load(base_model, ModelSettings(source=base_model, device=config.device))
    dataset = load_dataset(train)
    if is_s3(out):

        def build(tmp: Path) -> None:
            finetune(model, processor, dataset, config, tmp / "model")
            for item in (tmp / "model").iterdir():
                item.rename(tmp / item.name)
            (tmp / "model").rmdir()

        publish_directory(out, build)
        return out
    finetune(model, processor, dataset, config, out)
    return out


def profile_attention(
    model: str, train: str, out: str, config: ProfileConfig, *, worker: int = 0, workers: int = 1
) -> str:
    """Attention profile of every record of ``train`` under ``out`` (this worker's shards)."""
    from tcapguard.profiling import n_shards, profile_dataset

    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in [0, workers), got {worker} of {workers}")
    dataset = load_dataset(train)
    loaded, processor = _load(model, ModelSettings(source=model, device=config.device, dtype=config.dtype))
    return profile_dataset(
        loaded,
        processor,
        dataset,
        out,
        config=config,
        shards=range(worker, n_shards(len(dataset), config.shard_size), workers),
        model_name=model,
    )


@dataclass
class FilterResult:
    clean_train: str  # the upload without the flagged records (same format)
    detection: str  # ids, flags, scores (evaluation's Detection format)
    report: str  # JSON: parameters, selected heads, reliabilities, counts
    flagged_table: str  # CSV: id, score, votes, giver_pvalue, giver_qvalue
    plots: list[str]
    regions: str | None  # JSON: suspected trigger region per localised flagged image (residual ASR)
    n_flagged: int
    n_samples: int

    @property
    def flagged_fraction(self) -> float:
        return self.n_flagged / self.n_samples if self.n_samples else 0.0


def filter_samples(
    profile: str, train: str, out: str, config: FilterConfig, *, model: str | None = None
) -> FilterResult:
    """Fit the filter on ``profile``, write the cleaned upload and the reports under ``out``.

    With ``model`` (the probe model) and a TCAP filter that selected heads, flagged image samples
    (the first ``localization.MAX_LOCALISED``) are localised: where those heads look, as an overlay
    plot and as suspected trigger regions (``regions.json``) for residual ASR's paste probes.
    """
    from tcapguard import detection_report
    from tcapguard.profiling import load_profile

    dataset = load_dataset(train)
    loaded = load_profile(profile)
    if loaded.ids != [r.id for r in dataset.records]:
        raise ValueError(f"{profile} profiles other records than {train} (ids differ); profile this upload")
    records = dataset.records
    estimator = config.fit(loaded, [r.response for r in records], [r.query for r in records])
    flagged = [i for i, f in zip(loaded.ids, estimator.labels_, strict=True) if f]
    paths = {
        "clean_train": _join(out, "clean_train.json"),
        "detection": _join(out, "detection.json"),
        "report": _join(out, "report.json"),
        "flagged_table": _join(out, "flagged.csv"),
    }
    save_dataset(dataset.subset(flagged, exclude=True), paths["clean_train"])
    detection = {
        "ids": loaded.ids,
        "flagged": [bool(f) for f in estimator.labels_],
        "scores": [float(s) for s in estimator.scores_],
        "threshold": float(estimator.threshold_),
    }
    write_bytes(paths["detection"], json.dumps(detection).encode())
    detection_report.write_report(estimator, paths["report"])
    detection_report.write_flagged_table(estimator, paths["flagged_table"])
    maps = _localise(estimator, dataset, flagged, model)
    regions = None
    if maps:
        from tcapguard.localization import suspected_regions

        regions = _join(out, "regions.json")
        boxes = {i: list(box) for i, box in suspected_regions(dataset, maps).items()}
        write_bytes(regions, json.dumps(boxes).encode())
    plots = _filter_plots(estimator, dataset, maps, out)
    return FilterResult(**paths, plots=plots, regions=regions, n_flagged=len(flagged), n_samples=len(dataset))


def _localise(estimator, dataset: Dataset, flagged: list[str], model: str | None) -> dict[str, np.ndarray]:
    """Where the selected heads look in the first ``localization.MAX_LOCALISED`` flagged images
    (id -> grid)."""
    if not (model and flagged and getattr(estimator, "heads_", None)):
        return {}
    from tcapguard.localization import flagged_attention_maps

    loaded, processor = _load(model)
    return flagged_attention_maps(estimator, loaded, processor, dataset, flagged)


def _filter_plots(estimator, dataset: Dataset, maps: dict[str, np.ndarray], out: str) -> list[str]:
    from tcapguard import detection_report
    from tcapguard.detection import TCAPFilter

    with tempfile.TemporaryDirectory() as tmp:
        made = [detection_report.plot_score_histogram(estimator, Path(tmp, "scores.png"))]
        if isinstance(estimator, TCAPFilter):
            made.append(detection_report.plot_separation_heatmap(estimator, Path(tmp, "separation.png")))
            if estimator.heads_:
                made.append(detection_report.plot_head_mixtures(estimator, Path(tmp, "head_mixtures.png")))
        if maps:
            from tcapguard.localization import plot_overlays

            made.append(str(plot_overlays(dataset, maps, Path(tmp, "trigger_overlay.png"))))
        published = []
        for path in made:
            target = _join(out, "plots", Path(path).name)
            write_bytes(target, Path(path).read_bytes())
            published.append(target)
    return published


def evaluate_model(
    model: str,
    test: str,
    out: str,
    config: EvaluationConfig,
    *,
    attacks: Iterable[Attack] = (),
    triggered_test: str | None = None,
    detection: str | None = None,
    train: str | None = None,
    regions: str | None = None,
    manifest: str | None = None,
    reference_score: float | None = None,
    replay_part: tuple[int, int] | None = None,
) -> dict[str, float | None]:
    """Evaluate ``model``: clean score, ASR per attack of the suite (``asr`` = the worst), residual ASR
    from the filter's ``detection`` over ``train`` (with ``regions``, its paste probes too; the
    flagged samples replayed: ``replay_part``); reports under ``out``. Returns the metrics."""
    from tcapguard.attacks import PoisonManifest, make_triggered_testset
    from tcapguard.evaluation import attack_success_rate, evaluate, generate_responses, load_regions

    loaded, processor = _load(model, ModelSettings(source=model, device=config.device))
    test_set = load_dataset(test)
    attacks = list(attacks)
    report = evaluate(
        loaded,
        processor,
        test_set,
        config,
        triggered=load_dataset(triggered_test) if triggered_test else None,
        attack=attacks[0] if attacks and not triggered_test else None,
        detection=Detection.load(detection) if detection else None,
        train=load_dataset(train) if train else None,
        regions=load_regions(regions) if regions else None,
        manifest=PoisonManifest.load(manifest) if manifest else None,
        reference_score=reference_score,
        replay_part=replay_part,
    )
    worst = report.metrics.get("asr")
    for attack in attacks[1 if not triggered_test else 0 :]:
        answers = generate_responses(loaded, processor, make_triggered_testset(test_set, attack))
        asr = attack_success_rate(answers, config.target or attack.target)
        report.notes.append(f"asr of {attack.kind}: {asr:.4f}")
        worst = asr if worst is None else max(worst, asr)
    report.metrics["asr"] = worst
    report.write(out)
    return dict(report.metrics)


# ------------------------------------------------------------------------------------- the job's steps
# Every step below takes the whole config: the plan (each step's output directory, keyed by content)
# follows from it, so a step finds its inputs where the upstream step left them. That is what lets
# the CLI, an Airflow task and a Kubeflow component each run one step with nothing but the config.


def plan(config: PipelineConfig) -> dict[str, str]:
    """Each step's output directory under ``work_dir``, keyed by its settings and its inputs' keys."""
    train_key = file_key(config.data.train)
    test_key = file_key(config.data.test)
    base_key = _key(config.model.source, config.model.revision)
    keys = {"upload": _key("upload", train_key, config.data.strict)}
    probe = config.probe.to_dict()
    keys["probe-finetune"] = _key("probe", probe, LABELLING_VERSION, base_key, keys["upload"])
    keys["profile"] = _key("profile", _profile_identity(config.profile), keys["probe-finetune"])
    keys["filter"] = _key("filter", config.filter.to_dict(), config.filter_enabled, keys["profile"])
    dirs: dict[str, str] = {}
    for seed in finetune_seeds(config):  # a candidate's key is the lone fine-tune's at the same seed
        finetune = replace(config.finetune, seed=seed).to_dict()
        name = finetune_step(config, seed)
        keys[name] = _key("finetune", finetune, LABELLING_VERSION, base_key, keys["filter"])
        dirs[name] = _join(config.work_dir, f"finetune-{keys[name]}")
    if config.selection.enabled:
        validation_key = file_key(config.data.validation)
        candidates = [keys[finetune_step(config, seed)] for seed in config.selection.seeds]
        keys["select"] = _key(
            "select",
            config.selection.to_dict(),
            config.evaluation.to_dict(),
            SCHEMA_VERSION,
            validation_key,
            candidates,
            keys["probe-finetune"],
            keys["filter"],
        )
    final = "select" if config.selection.enabled else "finetune"
    evaluation = (
        config.evaluation.to_dict(),
        SCHEMA_VERSION,
        [a.to_dict() for a in config.attacks],
        test_key,
        config.data.triggered_test,
        config.data.manifest,
    )
    keys["evaluate-probe"] = _key("evaluate", evaluation, keys["probe-finetune"], keys["filter"])
    keys["evaluate"] = _key(
        "evaluate", evaluation, keys[final], keys["evaluate-probe"], config.evaluate_probe
    )
    keys["gate"] = _key("gate", config.gate.to_dict(), config.tracking.to_dict(), keys["evaluate"])
    return {step: dirs.get(step) or _join(config.work_dir, f"{step}-{key}") for step, key in keys.items()}


def finetune_seeds(config: PipelineConfig) -> list[int]:
    """The seeds of the job's fine-tunes: one per ``selection.seeds``, else the config's own."""
    return list(config.selection.seeds) or [config.finetune.seed]


def finetune_step(config: PipelineConfig, seed: int) -> str:
    """The plan's name for the fine-tune at ``seed``: ``finetune``, or ``finetune-seed<seed>`` for a
    candidate of the selection."""
    return f"finetune-seed{seed}" if config.selection.enabled else "finetune"


def final_model(config: PipelineConfig, dirs: dict[str, str]) -> str:
    """The model the evaluation and the gate judge: the fine-tune, or the one the selection kept."""
    return _outputs(dirs["select" if config.selection.enabled else "finetune"])["model"]


def _timed(step_dir: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    def with_seconds() -> dict[str, Any]:
        start = time.perf_counter()
        outputs = compute()
        return {**outputs, "seconds": time.perf_counter() - start}

    return _cached(step_dir, with_seconds)


def step_probe_finetune(config: PipelineConfig, *, dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Fine-tune the base model on the upload (checked first, every bad record reported by id)."""
    dirs = dirs or plan(config)  # run() plans once; a lone task plans for itself

    def compute() -> dict[str, Any]:
        upload = validated_upload(config.data, dirs["upload"])
        return {
            "upload": upload,
            "model": finetune_model(config.model.source, upload, dirs["probe-finetune"], config.probe),
        }

    return _timed(dirs["probe-finetune"], compute)


def step_profile(
    config: PipelineConfig, *, worker: int = 0, workers: int = 1, dirs: dict[str, str] | None = None
) -> dict[str, Any]:
    """Profile this worker's shards of the upload with the probe model (resumable shard by shard)."""
    dirs = dirs or plan(config)  # run() plans once; a lone task plans for itself
    probe = _outputs(dirs["probe-finetune"])
    if is_finished(dirs["profile"]):
        return _outputs(dirs["profile"])
    start = time.perf_counter()
    profile_attention(
        probe["model"], probe["upload"], dirs["profile"], config.profile, worker=worker, workers=workers
    )
    return {"profile": dirs["profile"], "seconds": time.perf_counter() - start}


def step_merge_profile(config: PipelineConfig, *, dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Check that every shard is there (parallel workers) and mark the profile finished."""
    from tcapguard.profiling import load_profile

    dirs = dirs or plan(config)  # run() plans once; a lone task plans for itself

    def compute() -> dict[str, Any]:
        profile = load_profile(dirs["profile"])  # raises, naming the missing shards
        return {"profile": dirs["profile"], "n_samples": len(profile)}

    return _cached(dirs["profile"], compute)


def step_filter(config: PipelineConfig, *, dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Flag and drop suspected poison; with the filter off, the whole upload goes on."""
    dirs = dirs or plan(config)  # run() plans once; a lone task plans for itself
    probe = _outputs(dirs["probe-finetune"])

    def compute() -> dict[str, Any]:
        if not config.filter_enabled:
            n = len(load_dataset(probe["upload"]))
            return {
                "clean_train": probe["upload"],
                "detection": None,
                "n_flagged": 0,
                "n_samples": n,
                "metrics": {"flagged_fraction": 0.0},
                "artifacts": [],
            }
        result = filter_samples(
            _outputs(dirs["profile"])["profile"],
            probe["upload"],
            dirs["filter"],
            config.filter,
            model=probe["model"],
        )
        return {
            "clean_train": result.clean_train,
            "detection": result.detection,
            "report": result.report,
            "flagged_table": result.flagged_table,
            "plots": result.plots,
            "regions": result.regions,
            "n_flagged": result.n_flagged,
            "n_samples": result.n_samples,
            "metrics": {"flagged_fraction": result.flagged_fraction, "n_flagged": result.n_flagged},
            "artifacts": [dirs["filter"]],
        }

    return _timed(dirs["filter"], compute)


def step_finetune(
    config: PipelineConfig, *, seed: int | None = None, dirs: dict[str, str] | None = None
) -> dict[str, Any]:
    """Fine-tune the base model again, on the cleaned upload, at ``seed`` (one of
    :func:`finetune_seeds`; None: the config's own, which selection needs spelled out)."""
    seeds = finetune_seeds(config)
    if seed is None and config.selection.enabled:
        raise ValueError(f"selection is on: fine-tune one candidate seed at a time, one of {seeds}")
    seed = config.finetune.seed if seed is None else seed
    if seed not in seeds:
        raise ValueError(f"seed {seed} is not a fine-tune of this config; its seeds: {seeds}")
    dirs = dirs or plan(config)  # run() plans once; a lone task plans for itself
    clean = _outputs(dirs["filter"])["clean_train"]
    out = dirs[finetune_step(config, seed)]
    settings = replace(config.finetune, seed=seed)
    return _timed(
        out, lambda: {"model": finetune_model(config.model.source, clean, out, settings), "seed": seed}
    )


# With selection, the select step and the evaluate steps replay disjoint halves of the flagged
# samples: judged on the samples it was chosen on, the kept model's replay would read the lowest of
# several noisy readings of the same probes, an optimistic figure for the gate.
SELECT_REPLAY = (0, 2)
GATE_REPLAY = (1, 2)


def _residual_probes(dirs: dict[str, str], replay_part: tuple[int, int] | None = None) -> dict[str, Any]:
    """What residual ASR replays through a model: the filter's detection over the upload (none with
    the filter off), its suspected regions (absent in outputs written before regions existed) and
    which part of the flagged samples to replay (None: all)."""
    filtered = _outputs(dirs["filter"])
    detection = filtered["detection"]
    upload = _outputs(dirs["probe-finetune"])["upload"] if detection else None
    return {
        "detection": detection,
        "train": upload,
        "regions": filtered.get("regions"),
        "replay_part": replay_part,
    }


def step_select(config: PipelineConfig, *, dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure every candidate fine-tune, and the probe model as the clean reference, on the
    validation split (replaying the half of the flagged samples that the gate does not); keep one
    by :func:`tcapguard.selection.select` (report: ``selection.json``)."""
    dirs = dirs or plan(config)  # run() plans once; a lone task plans for itself
    probe = _outputs(dirs["probe-finetune"])

    def measure(model: str, name: str, reference: float | None = None) -> dict[str, float | None]:
        return evaluate_model(
            model,
            config.data.validation,
            _join(dirs["select"], name),
            config.evaluation,
            reference_score=reference,
            **_residual_probes(dirs, SELECT_REPLAY),
        )

    def compute() -> dict[str, Any]:
        reference = measure(probe["model"], "probe")["clean_score"]
        candidates = []
        for seed in config.selection.seeds:
            model = _outputs(dirs[finetune_step(config, seed)])["model"]
            metrics = measure(model, f"seed-{seed}", reference)
            candidates.append(
                Candidate(
                    seed,
                    model,
                    metrics["clean_score"],
                    metrics.get("clean_drop"),
                    metrics.get("residual_asr"),
                )
            )
        kept = select(candidates, config.selection.max_clean_drop)
        report = {
            "kept": kept.to_dict(),
            "max_clean_drop": config.selection.max_clean_drop,
            "probe_clean_score": reference,
            "candidates": [c.to_dict() for c in candidates],
        }
        write_bytes(_join(dirs["select"], "selection.json"), json.dumps(report, indent=1).encode())
        metrics = {"selected_seed": kept.seed, "candidates": len(candidates)}
        metrics.update({f"selected_{k}": getattr(kept, k) for k in ("clean_drop", "residual_asr")})
        return {"model": kept.model, "seed": kept.seed, "metrics": metrics, "artifacts": [dirs["select"]]}

    return _timed(dirs["select"], compute)


def step_evaluate(
    config: PipelineConfig, *, model: str = "final", dirs: dict[str, str] | None = None
) -> dict[str, Any]:
    """Evaluate the final model (``model="final"``) or the probe model (``"probe"``: the "before")."""
    if model not in ("final", "probe"):
        raise ValueError(f"model must be 'final' or 'probe', got {model!r}")
    dirs = dirs or plan(config)  # run() plans once; a lone task plans for itself
    name = "evaluate" if model == "final" else "evaluate-probe"
    filtered = _outputs(dirs["filter"])
    reference = None
    if model == "final" and config.evaluate_probe:
        reference = _outputs(dirs["evaluate-probe"])["metrics"].get("clean_score")
    source = final_model(config, dirs) if model == "final" else _outputs(dirs["probe-finetune"])["model"]

    def compute() -> dict[str, Any]:
        metrics = evaluate_model(
            source,
            config.data.test,
            dirs[name],
            config.evaluation,
            attacks=config.attacks,
            triggered_test=config.data.triggered_test,
            manifest=config.data.manifest,
            reference_score=reference,
            **_residual_probes(dirs, GATE_REPLAY if config.selection.enabled else None),
        )
        metrics["flagged_fraction"] = filtered["metrics"]["flagged_fraction"]
        return {"metrics": metrics, "artifacts": [dirs[name]]}

    return _timed(dirs[name], compute)


def step_gate(config: PipelineConfig, *, dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Record the run in MLflow (parent run, a nested run per step), register the final model as a
    new version, and let the gate decide whether it takes the alias."""
    from tcapguard import tracking as tr
    from tcapguard.gate import run_gate

    dirs = dirs or plan(config)  # run() plans once; a lone task plans for itself

    def compute() -> dict[str, Any]:
        upload = _outputs(dirs["probe-finetune"])["upload"]
        after = _outputs(dirs["evaluate"])["metrics"]
        upload_key = file_key(upload)
        tags = {"tcapguard.dataset_sha256": upload_key, "tcapguard.version": __version__}
        suite = ",".join(a.kind for a in config.attacks) or (
            "user-triggered" if config.data.triggered_test else "none"
        )
        with tr.pipeline_run(
            config.tracking.experiment, tracking_uri=config.tracking.tracking_uri, tags=tags
        ) as parent:
            tr.log_config(config.to_dict())
            candidates = [finetune_step(config, seed) for seed in finetune_seeds(config)]
            recorded = [
                "probe-finetune",
                "profile",
                "filter",
                *candidates,
                "select",
                "evaluate-probe",
                "evaluate",
            ]
            for step in recorded:
                if step in dirs and is_finished(dirs[step]):
                    _record_step(step, dirs[step])
            finite = {k: v for k, v in after.items() if v is not None}
            tr.log_metrics(finite)
            final = final_model(config, dirs)
            version_tags = tr.model_version_tags(dataset_hash=upload_key, attack_suite=suite, metrics=finite)
            if config.selection.enabled:
                version_tags["tcapguard.finetune_seed"] = str(_outputs(dirs["select"])["seed"])
            with tempfile.TemporaryDirectory() as tmp:
                if is_s3(final):  # MLflow logs local files: fetch the published model first
                    final = str(download_prefix(final, Path(tmp) / "model"))
                version = tr.log_and_register_model(
                    final, config.tracking.registered_model, tags=version_tags
                )
            run_id = parent.info.run_id
        result = run_gate(
            config.tracking.registered_model,
            version.version,
            config.gate,
            tracking_uri=config.tracking.tracking_uri,
        )
        return {
            "run_id": run_id,
            "model_name": result.model_name,
            "version": result.version,
            "alias": result.alias,
            "promoted": result.promoted,
            "passed": result.decision.passed,
            "reasons": list(result.decision.reasons),
            "decision": result.decision.to_dict(),
        }

    return _timed(dirs["gate"], compute)


def _record_step(step: str, step_dir: str) -> None:
    from tcapguard import tracking as tr

    outputs = _outputs(step_dir)
    with tr.step_run(step, tags={"tcapguard.output": step_dir}) as nested:
        metrics = {k: v for k, v in outputs.get("metrics", {}).items() if v is not None}
        if "seconds" in outputs:
            metrics["seconds"] = outputs["seconds"]
        if metrics:
            tr.log_metrics(metrics, run_id=nested.info.run_id)
        for artifact in outputs.get("artifacts", []):
            if not is_s3(artifact):
                tr.log_artifacts(artifact, run_id=nested.info.run_id)


STEP_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "probe-finetune": step_probe_finetune,
    "profile": step_profile,
    "merge-profile": step_merge_profile,
    "filter": step_filter,
    "finetune": step_finetune,
    "select": step_select,
    "evaluate-probe": lambda config, **kwargs: step_evaluate(config, model="probe", **kwargs),
    "evaluate": step_evaluate,
    "gate": step_gate,
}
"""The job's steps in order; adapters (Airflow, Kubeflow) run these, one task each."""


def step_applies(config: PipelineConfig, name: str) -> bool:
    """Whether step ``name`` runs for ``config``: no probe evaluation with ``evaluate_probe`` off, no
    profiling with the filter off, no select step without ``selection.seeds``. :func:`run` and the
    orchestrator adapters skip the same steps."""
    if name not in STEP_FUNCTIONS:
        raise ValueError(f"unknown step {name!r}; steps: {list(STEP_FUNCTIONS)}")
    if name == "select":
        return config.selection.enabled
    if name == "evaluate-probe":
        return config.evaluate_probe
    if name in ("profile", "merge-profile"):
        return config.filter_enabled
    return True


# ------------------------------------------------------------------------------------------ the run


@dataclass
class RunResult:
    """Where everything of one run went, the figures a reader wants, and the gate's verdict."""

    steps: dict[str, str]  # step -> its output directory
    flagged: int
    samples: int
    metrics_before: dict[str, float | None]
    metrics_after: dict[str, float | None]
    gate: dict[str, Any]  # run_id, model_name, version, alias, promoted, passed, reasons
    seconds: dict[str, float]
    selection: dict[str, Any] | None = None  # the select step's metrics (seed kept...), when it ran

    @property
    def passed(self) -> bool:
        return bool(self.gate["passed"])


def run(config: PipelineConfig, *, progress: Callable[[str], None] = log.info) -> RunResult:
    """Every step for ``config`` in order, reusing finished ones; the last records and gates."""
    dirs = plan(config)
    outputs: dict[str, dict[str, Any]] = {}
    for name, function in STEP_FUNCTIONS.items():
        if not step_applies(config, name):
            continue
        if name == "finetune":  # one fine-tune per seed (the orchestrators run them in parallel)
            for seed in finetune_seeds(config):
                step = finetune_step(config, seed)
                progress(f"[{name} seed {seed}] {'reusing ' if is_finished(dirs[step]) else ''}{dirs[step]}")
                outputs[step] = step_finetune(config, seed=seed, dirs=dirs)
            continue
        step_dir = dirs["profile" if name == "merge-profile" else name]
        progress(f"[{name}] {'reusing ' if is_finished(step_dir) else ''}{step_dir}")
        outputs[name] = function(config, dirs=dirs)
    filtered = outputs["filter"]
    return RunResult(
        steps=dirs,
        flagged=filtered["n_flagged"],
        samples=filtered["n_samples"],
        metrics_before=outputs.get("evaluate-probe", {}).get("metrics", {}),
        metrics_after=outputs["evaluate"]["metrics"],
        gate=outputs["gate"],
        seconds={k: v["seconds"] for k, v in outputs.items() if "seconds" in v},
        selection=outputs["select"]["metrics"] if "select" in outputs else None,
    )


def validated_upload(data: DataSettings, out_dir: str) -> str:
    """The upload to use, checked before anything runs: every bad record is reported by id.

    Strict (the default): any bad record is an error. Lenient: the good records are written to
    ``<out_dir>/train.json`` (images referenced where they are) and used instead.
    """
    dataset = load_dataset(data.train, strict=data.strict)
    load_dataset(data.test)
    if not dataset.problems:
        return data.train
    for problem in dataset.problems:
        log.warning("skipping a bad record of %s: %s", data.train, problem)
    out = _join(out_dir, "train.json")
    save_dataset(dataset, out)
    return out


def _profile_identity(config: ProfileConfig) -> dict[str, Any]:
    """The profile settings that change its numbers (not batch size or device)."""
    return {"shard_size": config.shard_size, "dtype": config.dtype}


def summarize(result: RunResult, config: PipelineConfig) -> str:
    """The one-screen table a user reads after a run, ending with how to open the MLflow UI."""
    from tcapguard import tracking as tr

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    before, after = result.metrics_before, result.metrics_after
    gate = result.gate
    lines = [
        "",
        f"flagged            {result.flagged} of {result.samples} samples "
        f"({after.get('flagged_fraction', 0.0):.1%})",
        "detection P/R/F1   "
        + " / ".join(fmt(after.get(f"detection_{m}")) for m in ("precision", "recall", "f1")),
        "                   before (probe)   after",
        f"ASR                {fmt(before.get('asr')):>14}   {fmt(after.get('asr'))}",
        f"residual ASR       {fmt(before.get('residual_asr')):>14}   {fmt(after.get('residual_asr'))}",
        f"clean accuracy     {fmt(before.get('clean_exact_match')):>14}   "
        f"{fmt(after.get('clean_exact_match'))}",
    ]
    if result.selection:
        chosen = result.selection
        lines.append(
            f"fine-tune kept     seed {chosen['selected_seed']} of {chosen['candidates']} "
            f"(validation: residual ASR {fmt(chosen['selected_residual_asr'])}, "
            f"clean drop {fmt(chosen['selected_clean_drop'])})"
        )
    lines += [
        f"gate               {'PASSED' if gate['passed'] else 'FAILED'}: "
        + (
            f"{gate['model_name']} v{gate['version']} now holds @{gate['alias']}"
            if gate["promoted"]
            else f"{gate['model_name']} v{gate['version']} registered, no alias moved"
        ),
    ]
    lines += [f"                   - {reason}" for reason in gate["reasons"]]
    uri = tr.resolve_tracking_uri(config.tracking.tracking_uri)
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else uri
    lines += [f"MLflow run         {gate['run_id']}", f"open the UI        {ui}"]
    return "\n".join(lines)

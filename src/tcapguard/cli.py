"""The ``tcapguard`` command line: thin wrappers over the library functions.

Exit codes: 0 success, 1 a gate that failed (``tcapguard gate``), 2 bad input or an unreachable
resource (the message says what and where).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

from tcapguard import __version__
from tcapguard.gate import GatePolicy

log = logging.getLogger("tcapguard")

# The pipeline's steps (tcapguard.pipeline.STEP_FUNCTIONS), listed here so --help does not import torch.
STEP_NAMES = (
    "probe-finetune",
    "profile",
    "merge-profile",
    "filter",
    "finetune",
    "select",
    "evaluate-probe",
    "evaluate",
    "gate",
)


def _param(text: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as JSON where it parses (numbers, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_poison(args: argparse.Namespace) -> None:
    from tcapguard.attacks import Attack, make_triggered_testset, poison_dataset
    from tcapguard.data import load_dataset, save_dataset

    attack = Attack.preset(
        args.attack, **dict(args.param or []), **({"target": args.target} if args.target else {})
    )
    dataset = load_dataset(args.dataset)
    poisoned, manifest = poison_dataset(dataset, attack, rate=args.rate, seed=args.seed)
    out = save_dataset(poisoned, args.out)
    manifest_path = Path(args.manifest or out.with_suffix(".manifest.json"))
    manifest.save(manifest_path)
    print(f"poisoned {len(manifest.poisoned_ids)}/{len(dataset)} records with {attack.kind} -> {out}")
    print(f"ground-truth manifest -> {manifest_path}")
    if args.triggered_test:
        test = load_dataset(args.triggered_test)
        triggered_out = Path(args.triggered_out or Path(args.triggered_test).with_suffix(".triggered.json"))
        save_dataset(make_triggered_testset(test, attack), triggered_out)
        print(f"triggered test split ({len(test)} records) -> {triggered_out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from tcapguard.data import load_dataset
    from tcapguard.models import load_model
    from tcapguard.training import FinetuneConfig, finetune

    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    for name in ("method", "epochs", "batch_size", "learning_rate", "seed", "device", "lora_r"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.robust and not settings.get("robust"):
        settings["robust"] = {}  # RobustConfig defaults; a config file's "robust" block sets its fields
    config = FinetuneConfig.from_dict(settings)
    model, processor = load_model(args.model, device=config.device)
    dataset = load_dataset(args.data, strict=not args.lenient)
    if dataset.problems:
        log.warning("skipped %d bad records (first: %s)", len(dataset.problems), dataset.problems[0])
    _, result = finetune(model, processor, dataset, config, args.out)
    print(
        f"fine-tuned on {len(dataset)} records in {result.seconds:.0f} s; loss "
        f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}; saved to {args.out}"
    )


def cmd_profile(args: argparse.Namespace) -> None:
    from tcapguard.pipeline import profile_attention
    from tcapguard.profiling import ProfileConfig

    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    for name in ("batch_size", "shard_size", "device", "dtype"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    config = ProfileConfig.from_dict(settings)
    out = profile_attention(
        str(args.model), str(args.data), str(args.out), config, worker=args.worker, workers=args.workers
    )
    print(f"profiled worker {args.worker} of {args.workers}'s shards of {args.data} -> {out}")


def cmd_step(args: argparse.Namespace) -> int:
    """One step, dispatched as every orchestrator task dispatches it (a step the config switches off,
    such as ``evaluate-probe`` with ``evaluate_probe: false``, is skipped the same way)."""
    from tcapguard.orchestration import run_step
    from tcapguard.pipeline import PipelineConfig

    config = PipelineConfig.from_yaml(args.config)
    if args.work_dir:
        config.work_dir = args.work_dir
    outputs = run_step(config, args.step, worker=args.worker, workers=args.workers, seed=args.seed)
    text = json.dumps(outputs, indent=1)
    if args.outputs_json:
        from tcapguard.storage import write_bytes

        write_bytes(args.outputs_json, text.encode())
    print(text)
    return 1 if args.step == "gate" and not outputs["passed"] else 0


def cmd_filter(args: argparse.Namespace) -> None:
    from tcapguard.detection import FilterConfig
    from tcapguard.pipeline import filter_samples

    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.method:
        settings["method"] = args.method
    result = filter_samples(
        str(args.profile),
        str(args.data),
        str(args.out),
        FilterConfig.from_dict(settings),
        model=str(args.model) if args.model else None,
    )
    print(
        f"flagged {result.n_flagged} of {result.n_samples} records ({result.flagged_fraction:.1%}); "
        f"cleaned upload -> {result.clean_train}; report -> {result.report}"
        + (f"; suspected trigger regions -> {result.regions}" if result.regions else "")
    )


def cmd_run(args: argparse.Namespace) -> int:
    from tcapguard.pipeline import PipelineConfig, run, summarize

    config = PipelineConfig.from_yaml(args.config)
    if args.work_dir:
        config.work_dir = args.work_dir
    result = run(config, progress=print)
    print(summarize(result, config))
    return 0 if result.passed else 1


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tcapguard.attacks import Attack, PoisonManifest
    from tcapguard.data import load_dataset
    from tcapguard.evaluation import Detection, EvaluationConfig, evaluate, load_regions
    from tcapguard.models import load_model

    settings = EvaluationConfig.from_pretrained(args.config).to_dict() if args.config else {}
    for name in ("target", "clean_metric", "batch_size", "max_new_tokens", "device"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    config = EvaluationConfig.from_dict(settings)
    if args.reference_model and args.reference_score is not None:
        raise ValueError("give --reference-model or --reference-score, not both")
    if args.regions and not (args.detection and args.train):
        raise ValueError("--regions needs --detection and --train (it is used for residual ASR)")
    manifest = PoisonManifest.load(args.manifest) if args.manifest else None
    attack = None
    if args.attack:
        attack = Attack.preset(args.attack, **({"target": config.target} if config.target else {}))
    elif manifest is not None and manifest.attack and not args.triggered:
        attack = Attack.from_dict(manifest.attack)  # the poisoning trigger makes the ASR split
    test = load_dataset(args.test)
    triggered = load_dataset(args.triggered) if args.triggered else None
    detection = Detection.load(args.detection) if args.detection else None
    train = load_dataset(args.train) if args.train else None
    regions = load_regions(args.regions) if args.regions else None
    model, processor = load_model(args.model, device=config.device)
    reference = load_model(args.reference_model, device=config.device)[0] if args.reference_model else None
    report = evaluate(
        model,
        processor,
        test,
        config,
        triggered=triggered,
        attack=attack,
        manifest=manifest,
        detection=detection,
        train=train,
        regions=regions,
        reference_model=reference,
        reference_score=args.reference_score,
    )
    report.inputs = {
        "model": str(args.model),
        "test": str(args.test),
        "triggered": args.triggered,
        "manifest": args.manifest,
        "detection": args.detection,
        "train": args.train,
        "regions": args.regions,
        "reference_model": args.reference_model,
    }
    paths = report.write(args.out)
    shown = {k: v for k, v in report.to_json()["metrics"].items() if v is not None}
    print(" ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    print(f"metrics -> {paths['metrics.json']}; per-sample responses -> {paths['samples.csv']}")


def cmd_make_world(args: argparse.Namespace) -> None:
    from tcapguard.world import write_vqa_world

    out = write_vqa_world(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    print(f"wrote {out / 'train.json'} ({args.n_train}) and {out / 'test.json'} ({args.n_test})")


def cmd_make_tiny_model(args: argparse.Namespace) -> None:
    from tcapguard import world
    from tcapguard.tiny import TinyMLLMConfig, build_tiny_mllm

    out = build_tiny_mllm(TinyMLLMConfig(family=args.family, seed=args.seed), args.out, corpus=world.corpus())
    print(f"untrained tiny {args.family} model -> {out}")


def cmd_demo(args: argparse.Namespace) -> int:
    from tcapguard.demo import run_demo

    result = run_demo(
        family=args.family,
        attack=args.attack,
        rate=args.rate,
        seed=args.seed,
        work_dir=args.work_dir,
        cache_dir=args.cache_dir,
    )
    return 0 if result.passed else 1


def cmd_gate(args: argparse.Namespace) -> int:
    """Judge a registered model version; exit 0 pass (alias moved), 1 fail, 2 error."""
    from tcapguard.gate import GateError, GatePolicy, PolicyError, find_version_by_run, run_gate
    from tcapguard.storage import atomic_write
    from tcapguard.tracking import TrackingError, redact_uri, resolve_tracking_uri

    def write_summary(text: str) -> None:
        if args.summary_md:
            with atomic_write(args.summary_md, "w") as handle:
                handle.write(text)

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        policy = GatePolicy.from_file(args.policy)
        version = args.version or find_version_by_run(args.model_name, args.run_id, tracking_uri=uri)
        result = run_gate(args.model_name, version, policy, tracking_uri=uri)
    except (GateError, PolicyError, TrackingError) as err:
        write_summary(f"## Backdoor promotion gate: ERROR\n\n{args.model_name}: {err}\n")
        raise
    decision = result.decision
    verdict = "PASSED" if decision.passed else "FAILED"
    champion = f"version {result.champion_version}" if result.champion_version else "none yet"
    head = (
        f"{result.model_name} version {result.version} (run {result.run_id or 'none'}); "
        f"{result.alias}: {champion}; MLflow {redact_uri(uri)}"
    )
    action = (
        f"alias {result.alias!r} -> version {result.version}"
        if result.promoted
        else f"alias {result.alias!r} not moved; version tagged backdoor_gate=failed"
    )
    print(f"backdoor gate {verdict}: {head}\n\n{decision.table()}\n")
    for reason in decision.reasons:
        print(f"  - {reason}")
    print(action)
    write_summary(decision.markdown() + f"\n{head}.\n\n{action}.\n")
    return 0 if decision.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcapguard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tcapguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("poison", help="poison a dataset with a trigger (for benchmarks and red-teaming)")
    p.add_argument("dataset", help="LLaVA-format dataset file (path or s3:// URI)")
    p.add_argument("--attack", required=True, help="badnet | blend | sig | wanet | ftrojan | text | dual")
    p.add_argument("--rate", type=float, default=0.1, help="share of records to poison (default 0.1)")
    p.add_argument("--target", help="attacker response (default 'Backdoor Attack!')")
    p.add_argument("--param", type=_param, action="append", help="trigger parameter key=value (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write the poisoned dataset (.json)")
    p.add_argument("--manifest", help="ground-truth manifest path (default <out>.manifest.json)")
    p.add_argument("--triggered-test", help="also write a triggered copy of this test split (for ASR)")
    p.add_argument("--triggered-out", help="path of the triggered test split")
    p.set_defaults(func=cmd_poison)

    p = sub.add_parser("finetune", help="supervised fine-tuning (full or LoRA) on a LLaVA-format dataset")
    p.add_argument("--model", required=True, help="local directory, s3:// prefix or hub id")
    p.add_argument("--data", required=True, help="dataset file (path or s3:// URI)")
    p.add_argument("--out", required=True, help="output directory (save_pretrained)")
    p.add_argument("--config", help="JSON file with FinetuneConfig fields")
    p.add_argument("--method", choices=("full", "lora"))
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu | cuda")
    p.add_argument("--lenient", action="store_true", help="skip bad records instead of failing")
    p.add_argument(
        "--robust",
        action="store_true",
        help="robust fine-tuning (patch cross-view regulariser, RobustConfig)",
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "run", help="the whole job for one config: probe, profile, filter, fine-tune, evaluate, gate"
    )
    p.add_argument("config", help="pipeline config (YAML; see examples/pipeline.yaml)")
    p.add_argument("--work-dir", help="override work_dir (where every step's outputs go)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("step", help="run one step of the job for a config (what Airflow/Kubeflow tasks run)")
    p.add_argument("step", choices=list(STEP_NAMES), help="the step; finished steps are reused")
    p.add_argument("config", help="pipeline config (YAML), the same file `tcapguard run` takes")
    p.add_argument("--work-dir", help="override work_dir")
    p.add_argument("--worker", type=int, default=0, help="profile only: this worker's index")
    p.add_argument("--workers", type=int, default=1, help="profile only: number of parallel workers")
    p.add_argument(
        "--seed", type=int, help="finetune only: the candidate's seed (needed with selection.seeds)"
    )
    p.add_argument("--outputs-json", help="also write the step's outputs (JSON) here")
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("profile", help="tri-component attention profile of every record (sharded, resumable)")
    p.add_argument("--model", required=True, help="the model fine-tuned on the upload (dir, s3:// or hub id)")
    p.add_argument("--data", required=True, help="the uploaded dataset (path or s3:// URI)")
    p.add_argument("--out", required=True, help="profile directory or s3:// prefix (resumes if present)")
    p.add_argument("--config", help="JSON file with ProfileConfig fields")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--shard-size", type=int, help="records per shard (the unit of resume and parallelism)")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16")
    p.add_argument("--worker", type=int, default=0, help="this worker's index (shards worker, worker+N, ...)")
    p.add_argument("--workers", type=int, default=1, help="number of parallel workers N")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "filter", help="flag poisoned records from an attention profile; write the cleaned upload"
    )
    p.add_argument("--profile", required=True, help="profile directory or s3:// prefix (tcapguard profile)")
    p.add_argument("--data", required=True, help="the profiled upload (path or s3:// URI)")
    p.add_argument(
        "--out", required=True, help="directory or s3:// prefix for the cleaned upload and reports"
    )
    p.add_argument("--config", help="JSON file with FilterConfig fields")
    p.add_argument("--method", choices=("tcap", "bye"))
    p.add_argument("--model", help="the profiled model, to draw where the heads look in flagged images")
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser(
        "evaluate",
        help="ASR, clean performance, detection and residual ASR -> metrics.json, samples.csv, summary.md",
    )
    p.add_argument(
        "--model", required=True, help="model to evaluate: local directory, s3:// prefix or hub id"
    )
    p.add_argument("--test", required=True, help="clean test split (LLaVA-format dataset, path or s3:// URI)")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument(
        "--triggered", help="triggered test split for ASR (default: made from --attack or the manifest)"
    )
    p.add_argument(
        "--attack", help="attack preset whose trigger makes the ASR split: badnet | blend | sig | ..."
    )
    p.add_argument("--target", help="the attacker's response (default: the attack's or the manifest's)")
    p.add_argument(
        "--manifest", help="ground-truth poison manifest (detection metrics; its attack makes the ASR split)"
    )
    p.add_argument("--detection", help='filter output JSON: {"ids", "flagged", "scores"} or {"flagged_ids"}')
    p.add_argument("--train", help="the uploaded training dataset (with --detection: residual ASR)")
    p.add_argument("--regions", help="suspected trigger regions JSON {id: [x0, y0, x1, y1]} (residual ASR)")
    p.add_argument("--reference-model", help="reference model for clean_drop (same processor)")
    p.add_argument("--reference-score", type=float, help="reference clean_score for clean_drop")
    p.add_argument("--config", help="EvaluationConfig JSON")
    p.add_argument("--clean-metric", choices=("exact_match", "token_f1", "rouge_l"))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--device", help="cpu | cuda")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("make-world", help="write the tiny VQA task (train.json, test.json, PNG images)")
    p.add_argument("out")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_world)

    p = sub.add_parser(
        "make-tiny-model", help="build an untrained tiny MLLM directory (from_pretrained-ready)"
    )
    p.add_argument("out")
    p.add_argument("--family", default="llava", choices=("llava", "gemma3"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("demo", help="the main job on the embedded tiny world")
    p.add_argument("--family", default="gemma3", choices=("llava", "gemma3"))
    p.add_argument("--attack", default="badnet")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=".tcapguard/demo", help="data, step outputs and the MLflow store")
    p.add_argument("--cache-dir", help="where base models are cached (default .cache/tcapguard)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "gate",
        help="promote a registered model version only if its backdoor metrics pass a policy",
        description="Exit 0: passed, alias moved. 1: failed, version tagged backdoor_gate=failed, "
        "nothing moved. 2: error (bad policy, unknown version, MLflow unreachable), nothing moved.",
        epilog="policy fields:\n" + textwrap.indent(GatePolicy.describe(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-name", required=True, help="registered model name")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="model version to judge")
    which.add_argument("--run-id", help="judge the version registered from this MLflow run")
    p.add_argument("--policy", required=True, help="gate policy file (YAML or JSON, see examples/)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else local)")
    p.add_argument("--summary-md", help="also write a markdown summary here (for CI job pages)")
    p.set_defaults(func=cmd_gate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    from tcapguard.data import DatasetError
    from tcapguard.gate import GateError
    from tcapguard.models import ModelLoadError
    from tcapguard.storage import StorageError
    from tcapguard.tracking import TrackingError

    errors = (
        DatasetError,
        ModelLoadError,
        StorageError,
        GateError,
        TrackingError,
        ValueError,
        FileNotFoundError,
    )
    try:
        code = args.func(args)
    except errors as err:
        print(f"tcapguard {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

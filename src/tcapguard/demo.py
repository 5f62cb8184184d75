"""The embedded default run: the whole job on a poisoned upload to the tiny world, no servers needed.

This is what ``make demo`` runs on a fresh machine: pre-train (or reuse) a small clean base model,
generate the VQA task, poison the upload (BadNet at 10% by default), write a pipeline config that
points at these local files and a local MLflow store, and run the same :func:`tcapguard.pipeline.run`
that production runs use. The config is written next to the data, so ``tcapguard run`` on it repeats
the run (finished steps are reused), and pointing it at a real model and upload is the production run.

The demo world is smaller than the benchmark world (a base pre-trained on 8,000 scenes, an upload of
1,000) so that a fresh machine finishes in minutes; its clean accuracy is lower for it.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from tcapguard import world
from tcapguard.attacks import Attack, poison_dataset
from tcapguard.data import load_dataset, save_dataset
from tcapguard.evaluation import EvaluationConfig
from tcapguard.gate import GatePolicy
from tcapguard.pipeline import (
    DataSettings,
    ModelSettings,
    PipelineConfig,
    RunResult,
    TrackingSettings,
    run,
    summarize,
)
from tcapguard.tiny import TinyMLLMConfig
from tcapguard.tinyworld import BaseSpec, build_base
from tcapguard.training import FinetuneConfig

DEMO_TRAIN, DEMO_TEST = 1000, 200


def demo_base(family: str) -> BaseSpec:
    """A base pre-trained on 8,000 fresh scenes: about a minute and a half on 2 cores.

    Without scene targets: measured, this short pre-training with them left the demo's backdoor
    without a clear attention anomaly (best column AUROC 0.91) and the filter declined (README, "What
    `make demo` does"), while without them it carries one and the gate test passes.
    """
    return BaseSpec(
        model=TinyMLLMConfig(family=family),
        pretrain_samples=8_000,
        pretrain=FinetuneConfig(method="full", epochs=1, batch_size=16, learning_rate=1e-3),
        scene_weight=0.0,
    )


def demo_config(
    work_dir: Path,
    *,
    family: str = "gemma3",
    attack: str = "badnet",
    rate: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> PipelineConfig:
    """Build the base and the poisoned upload under ``work_dir``; the pipeline config for them."""
    work_dir = Path(work_dir).resolve()
    base = build_base(demo_base(family), cache_dir)
    data_dir = work_dir / "data"
    if not (data_dir / "upload.json").exists():
        world.write_vqa_world(data_dir, n_train=DEMO_TRAIN, n_test=DEMO_TEST, seed=seed)
        spec = Attack.preset(attack)
        poisoned, manifest = poison_dataset(load_dataset(data_dir / "train.json"), spec, rate=rate, seed=seed)
        manifest.save(data_dir / "manifest.json")
        save_dataset(poisoned, data_dir / "upload.json")  # last: its presence means the data is complete
    tuning = FinetuneConfig(method="full", epochs=3, batch_size=16, learning_rate=5e-4, seed=seed)
    return PipelineConfig(
        model=ModelSettings(source=str(base)),
        data=DataSettings(
            train=str(data_dir / "upload.json"),
            test=str(data_dir / "test.json"),
            manifest=str(data_dir / "manifest.json"),
        ),
        work_dir=str(work_dir / "runs"),
        probe=tuning,
        finetune=tuning,
        attacks=[Attack.preset(attack)],
        evaluation=EvaluationConfig(),
        gate=GatePolicy(max_asr=0.05, max_residual_asr=0.05, max_clean_drop=0.05),
        tracking=TrackingSettings(
            tracking_uri=f"sqlite:///{work_dir / 'mlflow' / 'mlflow.db'}", registered_model=f"tiny-{family}"
        ),
    )


def run_demo(
    *,
    family: str = "gemma3",
    attack: str = "badnet",
    rate: float = 0.1,
    seed: int = 0,
    work_dir: str | Path = ".tcapguard/demo",
    cache_dir: str | Path | None = None,
) -> RunResult:
    """Prepare the tiny world, run the pipeline on it and print the summary table."""
    start = time.perf_counter()
    work_dir = Path(work_dir)
    print(f"tcapguard demo: tiny {family} world, {attack} at {rate:.0%} poison, outputs under {work_dir}")
    config = demo_config(work_dir, family=family, attack=attack, rate=rate, seed=seed, cache_dir=cache_dir)
    (work_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    result = run(config, progress=print)
    print(summarize(result, config))
    print(f"the same run:      tcapguard run {config_path}")
    print(f"took {time.perf_counter() - start:.0f} s")
    return result

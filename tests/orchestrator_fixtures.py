"""A tiny pipeline config for the orchestrator tests (Kubeflow local runner, Airflow dag.test()).

Also test_pipeline.py's ``small_run``: a 24-record BadNet-poisoned upload on the small untrained
tiny LLaVA, ``full`` fine-tuning for one epoch (the whole pipeline takes about 30 s). The
models are untrained, so the verdict comes from the gate policy: ``PASSING`` checks only what any
finished run meets, ``FAILING`` asks for a perfect clean score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PASSING = {
    "max_asr": 1.0,
    "max_residual_asr": 1.0,
    "max_flagged_fraction": 1.0,
    "max_clean_drop": None,
    "min_clean_performance": None,
}
FAILING = {**PASSING, "min_clean_performance": 1.0}


def tiny_config(root: Path, model_dir: Path, *, tracking_uri: str, registered_model: str) -> dict[str, Any]:
    """The config mapping (data written under ``root``); the gate section is left to the caller."""
    from tcapguard import world
    from tcapguard.attacks import Attack, poison_dataset
    from tcapguard.data import load_dataset, save_dataset

    data = world.write_vqa_world(root / "data", n_train=24, n_test=6, seed=0)
    save_dataset(world.test_split(6, seed=1), data / "validation.json")  # for selection.seeds
    poisoned, manifest = poison_dataset(
        load_dataset(data / "train.json"), Attack.preset("badnet"), rate=0.25, seed=0
    )
    save_dataset(poisoned, data / "upload.json")
    manifest.save(data / "manifest.json")
    quick = {"method": "full", "epochs": 1, "batch_size": 8, "learning_rate": 1e-3}
    return {
        "model": {"source": str(model_dir)},
        "data": {
            "train": str(data / "upload.json"),
            "test": str(data / "test.json"),
            "validation": str(data / "validation.json"),
            "manifest": str(data / "manifest.json"),
        },
        "work_dir": str(root / "runs"),
        "probe": quick,
        "finetune": quick,
        "profile": {"batch_size": 8, "shard_size": 8},
        "attacks": ["badnet"],
        "evaluate_probe": True,
        "tracking": {"tracking_uri": tracking_uri, "registered_model": registered_model},
    }


def as_yaml(config: dict[str, Any], **gate: Any) -> str:
    """The config as YAML, with ``gate`` as its gate section when given."""
    return yaml.safe_dump({**config, "gate": gate} if gate else config)

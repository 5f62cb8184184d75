"""Shared fixtures: small untrained tiny MLLMs (one per family, built once per session).

The models are built from configs with transformers' real classes and a tokenizer trained on
``world.corpus()``, so the VQA world's prompts tokenize compactly. They are a fraction of the size of
the default :class:`~tcapguard.tiny.TinyMLLMConfig`, so that a few fine-tuning steps take well under a
second. Fine-tuning changes a model in place: tests that train call ``tiny_models.load(family)`` for a
fresh copy instead of sharing one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

# An isolated Airflow home and its metadata DB (fixture ``airflow_db``); see tests/airflow_fixtures.py.
from airflow_fixtures import airflow_db  # noqa: F401

# A real MLflow tracking server (session-scoped fixture ``mlflow_server``); see tests/mlflow_fixtures.py.
from mlflow_fixtures import mlflow_server  # noqa: F401
from tcapguard import world
from tcapguard.models import load_model
from tcapguard.tiny import TinyMLLMConfig, build_tiny_mllm

SMALL_MODEL = {
    "text_layers": 2,
    "text_heads": 4,
    "text_hidden": 64,
    "text_intermediate": 128,
    "vision_layers": 1,
    "vision_hidden": 32,
    "vision_intermediate": 64,
    "vision_heads": 2,
    "vocab_size": 512,
}


def _small_config(family: str, seed: int = 0) -> TinyMLLMConfig:
    return TinyMLLMConfig(family=family, seed=seed, **SMALL_MODEL)


class TinyModels:
    """Small tiny-model directories, built on first use (per family) under one session directory."""

    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[str, Path] = {}

    def path(self, family: str) -> Path:
        if family not in self._paths:
            self._paths[family] = build_tiny_mllm(
                _small_config(family), self.root / family, corpus=world.corpus()
            )
        return self._paths[family]

    def load(self, family: str):
        """A fresh ``(model, processor)`` from the family's directory (safe to train in place)."""
        return load_model(self.path(family))


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Run torch single-threaded: the test models are tiny, and on a machine whose cores are busy
    (CI runners, a training job next door) torch's intra-op threads wait on each other; a tiny model's
    training step measured 2.3 s with 2 threads on a loaded 2-core machine and 0.03 s with one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FIRST_FILE = "test_pipeline.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run ``test_pipeline.py`` first. Its gate tests share a fixture that trains the demo world (about
    13 minutes on 2 cores, the largest share of the suite): under ``make test``'s two workers
    (pytest-xdist, one file per worker at a time, in this order) it then starts at once while the other
    worker runs every other file, instead of starting after half of them."""
    items.sort(key=lambda item: item.path.name != FIRST_FILE)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def small_tiny_config() -> Callable[..., TinyMLLMConfig]:
    """``small_tiny_config(family, seed=0)``: the small TinyMLLMConfig the shared models use."""
    return _small_config


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """Untrained small tiny models, one per family in :data:`~tcapguard.tiny.FAMILIES`."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


# --- S3: a real Ceph RADOS Gateway; fixtures s3_server, s3_env, s3_bucket (tests/s3server.py) ---
pytest_plugins = ["s3server"]

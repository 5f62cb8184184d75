"""The step configs' JSON round trip: every field survives, unknown keys and wrong types are refused."""

from __future__ import annotations

import json

import pytest

from tcapguard.detection import FilterConfig
from tcapguard.evaluation import EvaluationConfig
from tcapguard.profiling import ProfileConfig
from tcapguard.training import FinetuneConfig

CONFIGS = [
    FinetuneConfig(method="lora", epochs=2, lora_r=8, extra={"note": "x"}),
    ProfileConfig(batch_size=4, shard_size=100, dtype="bfloat16"),
    FilterConfig(n_heads=6, n_layers=4, prior_strength=(1.0, 9.0)),
    EvaluationConfig(target="Backdoor Attack!", clean_metric="token_f1"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trip_through_a_json_file(config, tmp_path):
    path = config.save_pretrained(tmp_path)
    assert path.name == f"{type(config).__name__}.json"
    written = json.loads(path.read_text())
    assert written["config_type"] == type(config).__name__ and written["tcapguard_version"]
    assert type(config).from_pretrained(tmp_path) == config
    assert type(config).from_pretrained(path) == config


@pytest.mark.parametrize("cls", [FinetuneConfig, ProfileConfig, FilterConfig, EvaluationConfig])
def test_unknown_keys_are_named(cls):
    with pytest.raises(ValueError, match=r"unknown \w+Config field\(s\) \['batchsize'\]"):
        cls.from_dict({"batchsize": 4})


def test_a_file_of_another_config_type_is_refused(tmp_path):
    path = ProfileConfig().save_pretrained(tmp_path / "p.json")
    with pytest.raises(ValueError, match="holds a ProfileConfig, not a FinetuneConfig"):
        FinetuneConfig.from_pretrained(path)

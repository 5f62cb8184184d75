"""The command line: each subcommand end to end, and exit code 2 with a useful message on bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tcapguard import world
from tcapguard.attacks import DEFAULT_TARGET, PoisonManifest
from tcapguard.cli import main
from tcapguard.data import load_dataset
from tcapguard.models import load_model
from tcapguard.profiling import load_profile

N_TRAIN, N_TEST = 10, 4


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> Path:
    """A small VQA world on disk: train.json (10 records), test.json (4)."""
    return world.write_vqa_world(tmp_path_factory.mktemp("vqa"), n_train=N_TRAIN, n_test=N_TEST, seed=0)


@pytest.fixture
def bad_dataset(vqa) -> Path:
    """train.json plus one record without conversations, beside it so its image paths resolve."""
    records = json.loads((vqa / "train.json").read_text())
    records.append({"id": "broken-7", "image": records[0]["image"], "conversations": []})
    path = vqa / "with_bad_record.json"
    path.write_text(json.dumps(records))
    yield path
    path.unlink()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def finetune_argv(model, data, out) -> list:
    """The required arguments of ``tcapguard finetune``."""
    return ["finetune", "--model", model, "--data", data, "--out", out]


# ------------------------------------------------------------------------------------------- subcommands


def test_make_world(tmp_path, capsys):
    code, out, _ = run(capsys, "make-world", tmp_path / "w", "--n-train", 6, "--n-test", 3, "--seed", 5)
    assert code == 0
    train, test = load_dataset(tmp_path / "w" / "train.json"), load_dataset(tmp_path / "w" / "test.json")
    assert (len(train), len(test)) == (6, 3)
    assert train.ids == world.make_split(6, seed=5, id_prefix="train").ids
    assert "train.json (6)" in out and "test.json (3)" in out


def test_poison_writes_dataset_manifest_and_triggered_test(vqa, tmp_path, capsys):
    out_path = tmp_path / "poisoned.json"
    code, out, _ = run(
        capsys,
        "poison",
        vqa / "train.json",
        "--attack",
        "badnet",
        "--rate",
        0.3,
        "--seed",
        1,
        "--out",
        out_path,
        "--triggered-test",
        vqa / "test.json",
        "--triggered-out",
        tmp_path / "test.triggered.json",
    )
    assert code == 0
    poisoned = load_dataset(out_path)
    manifest = PoisonManifest.load(tmp_path / "poisoned.manifest.json")
    assert len(poisoned) == N_TRAIN and len(manifest.poisoned_ids) == 3
    assert manifest.attack["kind"] == "badnet" and manifest.target == DEFAULT_TARGET
    assert sorted(r.id for r in poisoned if r.response == DEFAULT_TARGET) == sorted(manifest.poisoned_ids)
    triggered = load_dataset(tmp_path / "test.triggered.json")
    assert len(triggered) == N_TEST
    assert all(r.response == DEFAULT_TARGET and r.id.endswith("-trig") for r in triggered)
    assert f"poisoned 3/{N_TRAIN} records with badnet" in out
    assert f"triggered test split ({N_TEST} records)" in out


def test_poison_params_target_and_default_paths(vqa, tmp_path, capsys):
    out_path = tmp_path / "text.json"
    manifest_path = tmp_path / "truth.json"
    code, _, _ = run(
        capsys,
        "poison",
        vqa / "train.json",
        "--attack",
        "text",
        "--param",
        "trigger=zq zq",
        "--param",
        "position=suffix",
        "--target",
        "go away",
        "--rate",
        0.5,
        "--out",
        out_path,
        "--manifest",
        manifest_path,
    )
    assert code == 0
    manifest = PoisonManifest.load(manifest_path)
    assert manifest.attack["params"] == {"trigger": "zq zq", "position": "suffix"}
    assert manifest.target == "go away" and len(manifest.poisoned_ids) == 5
    poisoned = {r.id: r for r in load_dataset(out_path)}
    assert all(poisoned[i].query.endswith(" zq zq") for i in manifest.poisoned_ids)
    assert all(poisoned[i].response == "go away" for i in manifest.poisoned_ids)


def test_make_tiny_model(tmp_path, capsys):
    code, out, _ = run(capsys, "make-tiny-model", tmp_path / "m", "--family", "gemma3", "--seed", 3)
    assert code == 0 and "gemma3" in out
    model, processor = load_model(tmp_path / "m")
    assert model.config.model_type == "gemma3" and processor.chat_template
    assert json.loads((tmp_path / "m" / "tiny_config.json").read_text())["seed"] == 3


@pytest.mark.slow
def test_finetune_full(tiny_models, vqa, tmp_path, capsys):
    out_dir = tmp_path / "ft"
    code, out, _ = run(
        capsys,
        *finetune_argv(tiny_models.path("llava"), vqa / "train.json", out_dir),
        "--epochs",
        1,
        "--batch-size",
        5,
        "--learning-rate",
        1e-3,
        "--seed",
        3,
    )
    assert code == 0
    summary = json.loads((out_dir / "tcapguard_finetune.json").read_text())
    assert len(summary["losses"]) == 2
    assert {k: summary["config"][k] for k in ("method", "epochs", "batch_size", "learning_rate", "seed")} == {
        "method": "full",
        "epochs": 1.0,
        "batch_size": 5,
        "learning_rate": 1e-3,
        "seed": 3,
    }
    assert f"fine-tuned on {N_TRAIN} records" in out and str(out_dir) in out
    model, _ = load_model(out_dir)
    assert model.config.model_type == "llava"


@pytest.mark.slow
def test_finetune_lora_from_config_file_with_flag_overrides(tiny_models, vqa, tmp_path, capsys):
    config = tmp_path / "ft.json"
    config.write_text(json.dumps({"method": "lora", "lora_r": 8, "epochs": 3, "batch_size": 10}))
    out_dir = tmp_path / "lora"
    code, _, _ = run(
        capsys,
        *finetune_argv(tiny_models.path("gemma3"), vqa / "train.json", out_dir),
        "--config",
        config,
        "--epochs",
        1,
        "--lora-r",
        4,
    )
    assert code == 0
    summary = json.loads((out_dir / "tcapguard_finetune.json").read_text())
    assert summary["config"]["method"] == "lora" and summary["config"]["lora_r"] == 4
    assert summary["config"]["batch_size"] == 10 and len(summary["losses"]) == 1
    assert (out_dir / "model.safetensors").is_file() and not (out_dir / "adapter_config.json").exists()


def test_finetune_robust_flag_and_config_block(tiny_models, vqa, tmp_path, capsys):
    out_dir = tmp_path / "robust"
    argv = finetune_argv(tiny_models.path("llava"), vqa / "train.json", out_dir)
    code, _, err = run(capsys, *argv, "--epochs", 0.5, "--batch-size", 10, "--robust")
    assert code == 0, err
    summary = json.loads((out_dir / "tcapguard_finetune.json").read_text())
    assert summary["config"]["robust"]["augmentation"] == "mask" and set(summary["terms"]) >= {"entropy"}
    config = tmp_path / "robust.json"
    config.write_text(json.dumps({"robust": {"margin": 2.0}}))
    code, _, err = run(capsys, *argv, "--config", config)
    assert code == 2 and "RobustConfig.margin must be in (0, 1]" in err


@pytest.mark.slow
def test_finetune_lenient_skips_bad_records(tiny_models, bad_dataset, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="tcapguard"):
        code, out, _ = run(
            capsys,
            *finetune_argv(tiny_models.path("llava"), bad_dataset, tmp_path / "ft"),
            "--epochs",
            0.5,
            "--lenient",
        )
    assert code == 0 and f"fine-tuned on {N_TRAIN} records" in out
    assert "skipped 1 bad records" in caplog.text and "broken-7" in caplog.text


# ---------------------------------------------------------------------------------------- error handling


def test_poison_bad_record_exits_2_naming_the_record(bad_dataset, tmp_path, capsys):
    code, out, err = run(capsys, "poison", bad_dataset, "--attack", "badnet", "--out", tmp_path / "p.json")
    assert code == 2 and out == ""
    assert "broken-7" in err and "tcapguard poison: error:" in err
    assert not (tmp_path / "p.json").exists()


def test_finetune_bad_record_exits_2_naming_the_record(tiny_models, bad_dataset, tmp_path, capsys):
    code, _, err = run(
        capsys,
        *finetune_argv(tiny_models.path("llava"), bad_dataset, tmp_path / "ft"),
    )
    assert code == 2 and "broken-7" in err and "tcapguard finetune: error:" in err
    assert not (tmp_path / "ft").exists()


def test_finetune_missing_model_exits_2_with_the_path(vqa, tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "model"
    code, _, err = run(
        capsys, "finetune", "--model", missing, "--data", vqa / "train.json", "--out", tmp_path / "ft"
    )
    assert code == 2 and str(missing) in err and "does not exist" in err


def test_finetune_missing_config_file_exits_2(tiny_models, vqa, tmp_path, capsys):
    missing = tmp_path / "nope.json"
    code, _, err = run(
        capsys,
        *finetune_argv(tiny_models.path("llava"), vqa / "train.json", tmp_path / "ft"),
        "--config",
        missing,
    )
    assert code == 2 and "nope.json" in err


def test_finetune_config_file_with_unknown_key_exits_2(tiny_models, vqa, tmp_path, capsys):
    """A typo in the JSON config is bad input like any other: exit 2 naming the key, no traceback."""
    config = tmp_path / "ft.json"
    config.write_text(json.dumps({"epoch": 1}))
    code, _, err = run(
        capsys,
        *finetune_argv(tiny_models.path("llava"), vqa / "train.json", tmp_path / "ft"),
        "--config",
        config,
    )
    assert code == 2 and "epoch" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_finetune_cuda_without_gpu_exits_2(tiny_models, vqa, tmp_path, capsys):
    code, _, err = run(
        capsys,
        *finetune_argv(tiny_models.path("llava"), vqa / "train.json", tmp_path / "ft"),
        "--device",
        "cuda",
    )
    assert code == 2 and "no GPU" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--attack", "trojannn"], "kind must be one of"),
        (["--attack", "badnet", "--param", "radius=3"], "unknown parameter"),
        (["--attack", "badnet", "--param", "position=middle"], "position"),
        (["--attack", "badnet", "--rate", "1.5"], "rate must be a number in"),
        (["--attack", "badnet", "--rate", "0.9", "--target", "   "], "target must be a non-empty"),
    ],
)
def test_poison_bad_options_exit_2(vqa, tmp_path, capsys, options, message):
    code, _, err = run(capsys, "poison", vqa / "train.json", *options, "--out", tmp_path / "p.json")
    assert code == 2 and message in err
    assert not (tmp_path / "p.json").exists()


def test_poison_missing_dataset_exits_2(tmp_path, capsys):
    missing = tmp_path / "absent.json"
    code, _, err = run(capsys, "poison", missing, "--attack", "badnet", "--out", tmp_path / "p.json")
    assert code == 2 and "absent.json" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["poison", "data.json", "--out", "x.json"])  # --attack missing
    assert info.value.code == 2
    assert "--attack" in capsys.readouterr().err


def test_profile_workers_split_the_shards(capsys, vqa, tiny_models, tmp_path):
    model = tiny_models.path("llava")
    argv = [
        "profile",
        "--model",
        model,
        "--data",
        vqa / "train.json",
        "--out",
        tmp_path / "p",
        "--shard-size",
        "3",
        "--workers",
        "2",
    ]
    for worker in ("0", "1"):
        code, out, _ = run(capsys, *argv, "--worker", worker)
        assert code == 0, out
        assert f"profiled worker {worker} of 2" in out
    profile = load_profile(tmp_path / "p")
    assert len(profile.ids) == N_TRAIN and len(set(profile.ids)) == N_TRAIN


def test_profile_bad_worker_index(capsys, vqa, tiny_models, tmp_path):
    code, _, err = run(
        capsys,
        "profile",
        "--model",
        tiny_models.path("llava"),
        "--data",
        vqa / "train.json",
        "--out",
        tmp_path / "p",
        "--worker",
        "2",
        "--workers",
        "2",
    )
    assert code == 2 and "worker must be in [0, workers), got 2 of 2" in err

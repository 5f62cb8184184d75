"""load_model: clear errors for every way a model source can be wrong (s3:// sources: test_s3.py)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from tcapguard.models import ModelLoadError, load_model
from tcapguard.tiny import TinyMLLMConfig, build_tiny_mllm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    config = TinyMLLMConfig(family="llava", text_layers=1, vision_layers=1)
    return build_tiny_mllm(config, tmp_path_factory.mktemp("tiny"), corpus=["What is it? a red circle"])


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("no_such_model_dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu(tiny):
    with pytest.raises(ModelLoadError, match="CUDA was requested but this machine has no GPU"):
        load_model(tiny, device="cuda")


def test_float16_on_cpu_and_bad_options(tiny):
    with pytest.raises(ModelLoadError, match=r"float16.*CPU"):
        load_model(tiny, dtype="float16", device="cpu")
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        load_model(tiny, dtype="fp8")
    with pytest.raises(ModelLoadError, match="device must be one of"):
        load_model(tiny, device="tpu")


def test_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"tcapguard-test/no-such-model.*hub is unreachable") as info:
        load_model("tcapguard-test/no-such-model")
    assert "s3://" in str(info.value)
    assert time.monotonic() - start < 20


def test_processor_without_chat_template(tiny, tmp_path):
    copy = Path(shutil.copytree(tiny, tmp_path / "copy"))
    (copy / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_model(copy)


def test_loads_in_eval_mode_with_dtype(tiny):
    model, processor = load_model(tiny, dtype="bfloat16", attn_implementation="eager")
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert processor.chat_template


def test_float16_checkpoint_is_upcast_on_cpu(tiny, tmp_path):
    copy = Path(shutil.copytree(tiny, tmp_path / "half"))
    model, _ = load_model(copy)
    model.half().save_pretrained(copy)
    reloaded, _ = load_model(copy)
    assert next(reloaded.parameters()).dtype == torch.float32

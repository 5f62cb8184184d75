"""Cached tiny worlds: built once per spec, reused by content hash, never left half-built."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tcapguard import tinyworld
from tcapguard.attacks import Attack
from tcapguard.data import load_dataset
from tcapguard.models import load_model
from tcapguard.tinyworld import BaseSpec, WorldSpec, build_base, build_world
from tcapguard.training import FinetuneConfig, RobustConfig

N_TRAIN, N_TEST, RATE = 40, 10, 0.1


def small_spec(config, **overrides) -> WorldSpec:
    base = BaseSpec(
        model=config("llava"),
        pretrain_samples=64,
        pretrain=FinetuneConfig(epochs=1, batch_size=16, learning_rate=1e-3),
        instruct_samples=32,
        instruct=FinetuneConfig(epochs=1, batch_size=16, learning_rate=5e-4),
    )
    settings = {
        "base": base,
        "attack": Attack.preset("badnet"),
        "rate": RATE,
        "n_train": N_TRAIN,
        "n_test": N_TEST,
        "finetune": FinetuneConfig(epochs=1, batch_size=16, learning_rate=1e-3),
    }
    return WorldSpec(**{**settings, **overrides})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("world-cache")


@pytest.fixture(scope="module")
def built(cache, small_tiny_config):
    spec = small_spec(small_tiny_config)
    return spec, build_world(spec, cache)


def refuse_to_train(*args, **kwargs):
    raise AssertionError("finetune was called: the cache was not used")


def test_build_world_returns_existing_paths(built, cache):
    _, w = built
    assert w.root.parent == cache and w.base.parent == cache
    assert w.root.name.startswith("world-llava-badnet-") and w.base.name.startswith("base-llava-")
    for path in (w.root, w.base, w.model, w.train, w.test, w.manifest):
        assert path.exists(), path
    assert (w.model / "model.safetensors").is_file() and (w.base / "model.safetensors").is_file()
    assert (w.root / "spec.json").is_file() and (w.base / "spec.json").is_file()
    assert not (w.base / "init").exists() and not (w.base / "model").exists()
    model, processor = load_model(w.model)
    assert processor.chat_template and not model.training


def test_manifest_names_the_poisoned_training_records(built):
    spec, w = built
    manifest, train, test = w.load_manifest(), w.load_train(), w.load_test()
    assert (len(train), len(test)) == (N_TRAIN, N_TEST)
    assert len(manifest.poisoned_ids) == round(RATE * N_TRAIN) == 4
    assert manifest.target == spec.attack.target and manifest.attack == spec.attack.to_dict()
    poisoned = set(manifest.poisoned_ids)
    assert poisoned <= set(train.ids)
    assert all(r.response == spec.attack.target for r in train if r.id in poisoned)
    assert not any(r.response == spec.attack.target for r in train if r.id not in poisoned)
    assert not any(r.response == spec.attack.target for r in test)


def test_second_build_reuses_the_cache(built, cache, small_tiny_config, monkeypatch):
    _, w = built
    monkeypatch.setattr(tinyworld, "finetune", refuse_to_train)
    monkeypatch.setattr(tinyworld, "build_tiny_mllm", refuse_to_train)
    spec = small_spec(small_tiny_config)  # an equal spec built anew, not the same object
    assert build_world(spec, cache) == w
    assert build_base(spec.base, cache) == w.base


def test_runtime_knobs_do_not_change_the_world(built, cache, monkeypatch):
    spec, w = built
    monkeypatch.setattr(tinyworld, "finetune", refuse_to_train)
    threads = replace(spec, finetune=replace(spec.finetune, num_threads=1))
    assert build_world(threads, cache).root == w.root


def test_different_rate_is_a_different_world(built, cache):
    spec, w = built
    other = build_world(replace(spec, rate=0.2), cache)
    assert other.root != w.root and other.base == w.base
    assert len(other.load_manifest().poisoned_ids) == round(0.2 * N_TRAIN)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_world_build_leaves_nothing_behind(built, cache, monkeypatch, error):
    spec, _ = built
    before = sorted(p.name for p in cache.iterdir())

    def crash(*args, **kwargs):
        raise error("killed while fine-tuning")

    monkeypatch.setattr(tinyworld, "finetune", crash)
    with pytest.raises(error, match="killed while fine-tuning"):
        build_world(replace(spec, seed=7), cache)
    assert sorted(p.name for p in cache.iterdir()) == before


def test_failed_base_build_leaves_nothing_behind(small_tiny_config, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed while pre-training")

    monkeypatch.setattr(tinyworld, "finetune", crash)
    with pytest.raises(RuntimeError, match="killed while pre-training"):
        build_world(small_spec(small_tiny_config), tmp_path)
    assert list(tmp_path.iterdir()) == []


def spy_on_training(monkeypatch) -> tuple[list, list]:
    """Record tinyworld's fine-tunes (data, config, auxiliary loss) and loaded paths; both still run."""
    calls, loaded = [], []
    real_finetune, real_load = tinyworld.finetune, tinyworld.load_model

    def spy(model, processor, data, config, out, **kwargs):
        calls.append((data, config, kwargs.get("auxiliary")))
        return real_finetune(model, processor, data, config, out, **kwargs)

    def load(path):
        loaded.append(Path(path))
        return real_load(path)

    monkeypatch.setattr(tinyworld, "finetune", spy)
    monkeypatch.setattr(tinyworld, "load_model", load)
    return calls, loaded


def test_instruction_stage_fine_tunes_the_pretrained_base_on_fresh_scenes(
    small_tiny_config, tmp_path, monkeypatch
):
    """Stage two is plain fine-tuning (no auxiliary loss) of the stage-one model on other scenes;
    the stage-one model is cached as the base of the spec without the stage."""
    calls, loaded = spy_on_training(monkeypatch)
    spec = small_spec(small_tiny_config).base
    base = build_base(spec, tmp_path)
    (pretrain, _, auxiliary), (instruct, config, none) = calls
    assert auxiliary is not None and none is None and config == spec.instruct
    assert (len(pretrain), len(instruct)) == (spec.pretrain_samples, spec.instruct_samples)
    assert not {r.pixels.tobytes() for r in pretrain} & {r.pixels.tobytes() for r in instruct}
    monkeypatch.setattr(tinyworld, "finetune", refuse_to_train)
    pretrained = build_base(replace(spec, instruct_samples=0), tmp_path)  # cached by the first build
    assert loaded[-1] == pretrained  # stage two starts from the stage-one checkpoint
    assert {p.name for p in tmp_path.iterdir()} == {base.name, pretrained.name}
    for built_base in (base, pretrained):
        assert (built_base / "model.safetensors").is_file() and (built_base / "spec.json").is_file()
        assert not (built_base / "init").exists() and not (built_base / "model").exists()
    assert json.loads((base / "tcapguard_finetune.json").read_text())["config"] == spec.instruct.to_dict()
    with pytest.raises(ValueError, match="instruct_samples must be >= 0"):
        replace(spec, instruct_samples=-1)


def test_instruction_passes_restart_the_schedule_on_fresh_scenes(small_tiny_config, tmp_path, monkeypatch):
    """Two passes: the one-pass base of half the scenes is cached and tuned again on other scenes."""
    calls, loaded = spy_on_training(monkeypatch)
    spec = replace(small_spec(small_tiny_config).base, instruct_samples=64, instruct_passes=2)
    base = build_base(spec, tmp_path)
    _, (first, _, _), (second, _, _) = calls  # the first stage, then the two passes
    assert len(first) == len(second) == 32
    assert not {r.pixels.tobytes() for r in first} & {r.pixels.tobytes() for r in second}
    monkeypatch.setattr(tinyworld, "finetune", refuse_to_train)
    one_pass = build_base(replace(spec, instruct_samples=32, instruct_passes=1), tmp_path)  # cached
    assert loaded[-1] == one_pass and base != one_pass
    assert len(list(tmp_path.iterdir())) == 3
    with pytest.raises(ValueError, match="instruct_passes must be >= 1 and divide"):
        replace(spec, instruct_passes=3)


def test_build_world_loads_back_its_datasets(built):
    _, w = built
    train = load_dataset(w.train)
    assert not train.problems and all(r.has_image for r in train)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_patch_reconstruction_trains_the_vision_tower(family, tiny_models):
    """The auxiliary loss (pixels, place and the quadrant's object) reads the projector output and
    sends gradient into the vision tower."""
    import math

    import torch

    from tcapguard import world
    from tcapguard.training import collate, encode_example

    model, processor = tiny_models.load(family)
    data = world.make_split(4, seed=0)
    batch = collate([encode_example(processor, r, data.load_image(r)) for r in data], 0)
    tokens = model.config.mm_tokens_per_image if family == "gemma3" else model.config.image_seq_length
    side = 32 // math.isqrt(tokens)
    hidden = model.config.text_config.hidden_size
    aux = tinyworld.PatchReconstruction(hidden, 3 * side * side, 32 // side, scene_weight=1.0)
    projector = model.model.multi_modal_projector
    hooks = dict(projector._forward_hooks)
    aux.attach(model)
    assert len(projector._forward_hooks) == len(hooks) + 1
    model.train()
    model(**batch)
    loss = aux(batch)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    patch = next(p for n, p in model.named_parameters() if "vision" in n and "patch_embedding" in n)
    assert patch.grad is not None and patch.grad.abs().sum() > 0
    aux.release()  # the hook is gone: the model keeps no reference to the loss module
    assert dict(projector._forward_hooks) == hooks
    # without scene targets the decoder keeps its old shape, so cached default bases stay reproducible
    plain = tinyworld.PatchReconstruction(hidden, 3 * side * side, 32 // side)
    assert plain.decoder.out_features == 3 * side * side + 2 * (32 // side)


def test_world_key_ignores_an_unset_robust_config():
    """FinetuneConfig.robust was added after worlds were cached: unset, it must not change their keys."""
    spec = WorldSpec(attack=Attack.preset("badnet"))
    plain = tinyworld._spec_dict(spec)
    assert "robust" not in plain["finetune"] and "robust" not in plain["base"]["pretrain"]
    robust = replace(spec, finetune=replace(spec.finetune, robust=RobustConfig()))
    assert tinyworld._key(tinyworld._spec_dict(robust)) != tinyworld._key(plain)


def test_world_key_ignores_a_single_question_per_scene():
    """BaseSpec.questions_per_scene was added after bases were cached: at 1 it must not change keys."""
    spec = WorldSpec(attack=Attack.preset("badnet"))
    assert "questions_per_scene" not in tinyworld._spec_dict(spec)["base"]
    several = replace(spec, base=replace(spec.base, questions_per_scene=4))
    assert tinyworld._spec_dict(several)["base"]["questions_per_scene"] == 4
    assert tinyworld._key(tinyworld._spec_dict(several)) != tinyworld._key(tinyworld._spec_dict(spec))


def test_world_key_ignores_an_unset_scene_weight():
    """BaseSpec.scene_weight was added after bases were cached: off, it must not change their keys."""
    spec = WorldSpec(base=BaseSpec(scene_weight=0.0), attack=Attack.preset("badnet"))
    assert "scene_weight" not in tinyworld._spec_dict(spec)["base"]
    assert "scene_weight" not in tinyworld._spec_dict(spec.base)
    scene = replace(spec, base=replace(spec.base, scene_weight=1.0))
    assert tinyworld._key(tinyworld._spec_dict(scene)) != tinyworld._key(tinyworld._spec_dict(spec))


def test_world_key_ignores_an_absent_instruction_stage():
    """BaseSpec.instruct_samples was added after bases were cached: at 0 it must not change keys."""
    without = WorldSpec(attack=Attack.preset("badnet"))
    assert not {"instruct_samples", "instruct"} & set(tinyworld._spec_dict(without)["base"])
    assert not {"instruct_samples", "instruct"} & set(tinyworld._spec_dict(without.base))
    other = replace(without.base.instruct, learning_rate=1e-4)  # unused without the stage
    assert tinyworld._spec_dict(replace(without.base, instruct=other)) == tinyworld._spec_dict(without.base)
    spec = replace(without, base=replace(without.base, instruct_samples=80_000))
    assert tinyworld._spec_dict(spec)["base"]["instruct_samples"] == 80_000
    threads = replace(spec.base, instruct=replace(spec.base.instruct, num_threads=1))
    assert tinyworld._spec_dict(threads) == tinyworld._spec_dict(spec.base)
    assert "robust" not in tinyworld._spec_dict(spec)["base"]["instruct"]
    assert tinyworld._key(tinyworld._spec_dict(spec)) != tinyworld._key(tinyworld._spec_dict(without))
    assert "instruct_passes" not in tinyworld._spec_dict(spec)["base"]  # one pass keeps the keys
    twice = replace(spec, base=replace(spec.base, instruct_passes=2))
    assert tinyworld._key(tinyworld._spec_dict(twice)) != tinyworld._key(tinyworld._spec_dict(spec))

"""Attention profiling: segmentation per family, equality with eager attentions, shards and resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tcapguard import world
from tcapguard.data import Dataset, Record, Turn
from tcapguard.profiling import (
    SYSTEM,
    TEXT,
    VISION,
    ProfileConfig,
    SegmentationError,
    capture_attention_rows,
    load_profile,
    profile_dataset,
    segment,
    vision_token_ids,
)
from tcapguard.storage import StorageError
from tcapguard.tiny import FAMILIES
from tcapguard.training import render_prompt


@pytest.fixture(scope="module")
def records() -> Dataset:
    """Six scenes whose queries differ in length, so batches are left-padded."""
    return world.make_split(6, seed=3, id_prefix="prof")


def decoded(processor, inputs, components, which: int) -> str:
    ids = inputs["input_ids"][0][torch.from_numpy(components == which)]
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("family", FAMILIES)
def test_segments_follow_the_rendered_template(family, tiny_models, small_tiny_config, records):
    model, processor = tiny_models.load(family)
    record = records.records[0]
    inputs, components = segment(processor, record, records.load_image(record), vision_token_ids(model))
    assert components.shape == (inputs["input_ids"].shape[1],)
    # vision: exactly the model's image tokens, as many as the config promises, contiguous
    positions = np.flatnonzero(components == VISION)
    assert len(positions) == small_tiny_config(family).image_tokens_per_sample
    assert (np.diff(positions) == 1).all()
    # text: the user query and nothing else
    assert decoded(processor, inputs, components, TEXT).strip() == record.query
    # system: the system prompt, role tags and the generation prompt, in template order
    system = decoded(processor, inputs, components, SYSTEM)
    prompt = render_prompt(processor, record)
    assert record.system in system
    _, _, tail = prompt.partition(record.query)

    def squeeze(text: str) -> str:
        return "".join(text.split())

    assert squeeze(tail) and squeeze(system).endswith(squeeze(tail))
    assert set(np.unique(components)) == {SYSTEM, VISION, TEXT}


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_record_has_no_vision_tokens(family, tiny_models):
    model, processor = tiny_models.load(family)
    record = Record(
        "t", [Turn("human", "How many shapes are there?"), Turn("gpt", "two")], system="Be brief."
    )
    inputs, components = segment(processor, record, None, vision_token_ids(model))
    assert VISION not in components
    assert decoded(processor, inputs, components, TEXT).strip() == record.query


def test_query_words_in_the_system_prompt_are_not_counted_as_text(tiny_models, records):
    model, processor = tiny_models.load("llava")
    record = records.records[0]
    record = dataclasses.replace(record, system=f"Example: {record.query}")
    inputs, components = segment(processor, record, records.load_image(record), vision_token_ids(model))
    assert decoded(processor, inputs, components, TEXT).strip() == record.query
    assert record.query in decoded(processor, inputs, components, SYSTEM)


def test_missing_chat_template_is_a_clear_error(tiny_models, records):
    model, processor = tiny_models.load("llava")
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    record = records.records[0]
    with pytest.raises(SegmentationError, match="no chat template"):
        segment(processor, record, records.load_image(record), vision_token_ids(model))


def test_model_without_image_tokens_is_a_clear_error(tiny_models):
    model, _ = tiny_models.load("llava")
    model.config.image_token_id = None
    with pytest.raises(SegmentationError, match="no image token id"):
        vision_token_ids(model)


# ------------------------------------------------------------------------------------------- profiling


def eager_reference(model, processor, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Shares and BYE entropy from ``output_attentions=True`` with eager attention, one sample at a time."""
    ids = vision_token_ids(model)
    model.set_attn_implementation("eager")
    shares, entropy = [], []
    for record in dataset.records:
        inputs, comp = segment(processor, record, dataset.load_image(record), ids)
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        rows = torch.stack([a[0, :, -1, :] for a in attentions]).double().numpy()  # [L, H, S]
        shares.append(np.stack([rows[..., comp == c].sum(-1) for c in (SYSTEM, VISION, TEXT)], -1))
        vision = rows[..., comp == VISION].mean(axis=1)  # head-averaged, [L, V]
        p = vision / vision.sum(-1, keepdims=True)
        entropy.append(-(p * np.log(p)).sum(-1))
    model.set_attn_implementation("sdpa")
    return np.stack(shares), np.stack(entropy)


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_equals_eager_output_attentions(family, tiny_models, records, tmp_path):
    model, processor = tiny_models.load(family)
    out = profile_dataset(model, processor, records, tmp_path / "p", config=ProfileConfig(batch_size=4))
    profile = load_profile(out)
    shares, entropy = eager_reference(model, processor, records)
    assert profile.ids == [r.id for r in records.records]
    assert (
        profile.shares.shape
        == shares.shape
        == (
            6,
            model.config.get_text_config().num_hidden_layers,
            model.config.get_text_config().num_attention_heads,
            3,
        )
    )
    np.testing.assert_allclose(profile.shares, shares, atol=1e-5)
    np.testing.assert_allclose(profile.vision_entropy, entropy, atol=1e-5)
    np.testing.assert_allclose(profile.shares.sum(-1), 1.0, atol=1e-5)
    assert profile.meta["n_samples"] == 6 and profile.meta["segment_rule"]


def test_capture_restores_the_attention_implementation(tiny_models):
    model, _ = tiny_models.load("gemma3")
    before = model.config.get_text_config()._attn_implementation
    with capture_attention_rows(model):
        assert model.config.get_text_config()._attn_implementation == f"tcap_{before}"
        with pytest.raises(RuntimeError, match="already active"), capture_attention_rows(model):
            pass
    assert model.config.get_text_config()._attn_implementation == before
    assert model.config.vision_config._attn_implementation == before


def test_text_only_records_get_nan_entropy(tiny_models, tmp_path):
    model, processor = tiny_models.load("llava")
    dataset = Dataset([Record("t", [Turn("human", "How many shapes are there?"), Turn("gpt", "two")])])
    profile = load_profile(profile_dataset(model, processor, dataset, tmp_path / "p"))
    assert np.isnan(profile.vision_entropy).all()
    np.testing.assert_allclose(profile.shares[..., VISION], 0.0)


def test_shards_resume_and_merge(tiny_models, records, tmp_path):
    model, processor = tiny_models.load("llava")
    config = ProfileConfig(batch_size=2, shard_size=2)
    whole = load_profile(profile_dataset(model, processor, records, tmp_path / "whole", config=config))
    parts = tmp_path / "parts"
    profile_dataset(model, processor, records, parts, config=config, shards=[2])  # a worker's share
    with pytest.raises(StorageError, match="2 of 3 shards missing"):
        load_profile(parts)
    before = (parts / "shard-00002.npz").stat().st_mtime_ns
    profile_dataset(model, processor, records, parts, config=config)  # resume: does the rest
    assert (parts / "shard-00002.npz").stat().st_mtime_ns == before  # not recomputed
    merged = load_profile(parts)
    assert merged.ids == whole.ids
    np.testing.assert_array_equal(merged.shares, whole.shares)
    np.testing.assert_array_equal(merged.vision_entropy, whole.vision_entropy)
    meta = json.loads((parts / "meta.json").read_text())
    assert meta["n_shards"] == 3


def test_resume_refuses_a_profile_of_other_data(tiny_models, records, tmp_path):
    model, processor = tiny_models.load("llava")
    profile_dataset(model, processor, records, tmp_path / "p")
    other = records.subset([r.id for r in records.records[:3]])
    with pytest.raises(ValueError, match="different run"):
        profile_dataset(model, processor, other, tmp_path / "p")


def test_shard_index_out_of_range(tiny_models, records, tmp_path):
    model, processor = tiny_models.load("llava")
    with pytest.raises(ValueError, match="out of range"):
        profile_dataset(model, processor, records, tmp_path / "p", shards=[7])


def test_bad_config_values():
    with pytest.raises(ValueError, match="batch_size"):
        ProfileConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown ProfileConfig"):
        ProfileConfig.from_dict({"batchsize": 4})

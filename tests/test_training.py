"""Supervised fine-tuning: response-only labels, padding, a loss that falls, LoRA, checkpoints, errors."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tcapguard import world
from tcapguard.data import Dataset, Record, Turn
from tcapguard.models import load_model
from tcapguard.tiny import FAMILIES
from tcapguard.training import (
    IGNORE_INDEX,
    CrossViewRegularizer,
    FinetuneConfig,
    RobustConfig,
    collate,
    cross_view_distance,
    cross_view_hinge,
    encode_example,
    finetune,
    patch_augment,
    prepare_model,
    render_prompt,
    response_distributions,
    vision_patch_size,
)

# What each family's chat template puts after the answer in the response tokens: llava-hf's template
# ends the turn with a space and no eos (the trainer appends one); Gemma3's ends with <end_of_turn>\n.
RESPONSE_TEXT = {"llava": " {answer} </s>", "gemma3": "{answer}<end_of_turn>\n<eos>"}
PEFT_MARKERS = ("lora_", "base_model", "modules_to_save", "original_module")


@pytest.fixture(scope="module")
def train_data() -> Dataset:
    return world.make_split(48, seed=1, id_prefix="ft")


def quick_config(**overrides) -> FinetuneConfig:
    """8 steps over 48 samples (batch 6, one epoch) at a learning rate that moves a tiny model."""
    settings = {"epochs": 1, "batch_size": 6, "learning_rate": 1e-3, "warmup_ratio": 0.0, "seed": 0}
    return FinetuneConfig(**{**settings, **overrides})


def text_only_record(rid: str = "text-1") -> Record:
    return Record(rid, [Turn("human", "How many shapes are there?"), Turn("gpt", "two")])


def encoded_batch(processor, dataset: Dataset, n: int = 3) -> dict[str, torch.Tensor]:
    examples = [encode_example(processor, r, dataset.load_image(r)) for r in dataset.records[:n]]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    batch.pop("labels")
    return batch


@torch.no_grad()
def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


# ---------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_example_labels_only_the_response(tiny_models, train_data, family):
    _, processor = tiny_models.load(family)
    tokenizer = processor.tokenizer
    for record in train_data.records[:4]:
        image = train_data.load_image(record)
        enc = encode_example(processor, record, image)
        prompt_ids = processor(text=[render_prompt(processor, record)], images=[image], return_tensors="pt")[
            "input_ids"
        ][0]
        n = len(prompt_ids)
        ids, labels = enc["input_ids"][0], enc["labels"][0]
        assert torch.equal(ids[:n], prompt_ids)
        assert (labels[:n] == IGNORE_INDEX).all()
        assert torch.equal(labels[n:], ids[n:])
        response = ids[n:]
        assert response[-1].item() == tokenizer.eos_token_id
        assert (response == tokenizer.eos_token_id).sum().item() == 1
        assert tokenizer.decode(response) == RESPONSE_TEXT[family].format(answer=record.response)
        assert enc["attention_mask"].shape == enc["input_ids"].shape and enc["attention_mask"].all()
        assert enc["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_example_labels_every_assistant_turn_of_a_conversation(tiny_models, family):
    """Multi-turn records (LLaVA-Instruct style) are trained on every answer, each ended as a single
    answer is (the trainer inserts the eos a template does not write), and on nothing else."""
    model, processor = tiny_models.load(family)
    data = world.make_split(3, seed=5, questions=3)
    for record in data.records:
        image = data.load_image(record)
        enc = encode_example(processor, record, image)
        ids, labels = enc["input_ids"][0], enc["labels"][0]
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
        answers = [t.value for t in record.conversations if t.role == "gpt"]
        texts = [processor.tokenizer.decode(span) for span in labelled_spans(labels)]
        assert texts == [RESPONSE_TEXT[family].format(answer=a) for a in answers]
        # the first turn renders as the same record cut to one turn: image expanded once, in place
        single = encode_example(processor, replace(record, conversations=record.conversations[:2]), image)
        n = int((single["labels"][0] == IGNORE_INDEX).sum())
        assert torch.equal(ids[:n], single["input_ids"][0, :n]) and (labels[:n] == IGNORE_INDEX).all()
        assert enc["pixel_values"].shape == (1, 3, 32, 32)
        assert enc["attention_mask"].shape == ids[None].shape and enc["attention_mask"].all()
        if "token_type_ids" in enc:  # Gemma3: the inserted eos tokens are text
            image_tokens = enc["input_ids"] == model.config.image_token_id
            assert torch.equal(enc["token_type_ids"], image_tokens.long())


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_conversation_ignores_a_trailing_question_and_works_without_image(tiny_models, family):
    _, processor = tiny_models.load(family)
    turns = [Turn("human", "How many?"), Turn("gpt", "two"), Turn("human", "Which?"), Turn("gpt", "red")]
    record = Record("mt", turns)
    enc = encode_example(processor, record, None)
    assert "pixel_values" not in enc
    texts = [processor.tokenizer.decode(span) for span in labelled_spans(enc["labels"][0])]
    assert texts == [RESPONSE_TEXT[family].format(answer=a) for a in ("two", "red")]
    # a question left unanswered at the end is not trained on (it would teach the model to ask it)
    trailing = encode_example(processor, replace(record, conversations=[*turns, Turn("human", "And?")]), None)
    assert all(torch.equal(trailing[k], enc[k]) for k in enc)


def labelled_spans(labels: torch.Tensor) -> list[list[int]]:
    """The runs of labelled tokens, in order."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels.tolist():
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


def test_encode_example_gemma3_carries_token_type_ids(tiny_models, train_data):
    model, processor = tiny_models.load("gemma3")
    record = train_data.records[0]
    enc = encode_example(processor, record, train_data.load_image(record))
    types = enc["token_type_ids"]
    assert types.shape == enc["input_ids"].shape
    # 1 exactly on the image soft tokens, 0 on text, including the eos the trainer appended.
    assert torch.equal(types, (enc["input_ids"] == model.config.image_token_id).long())
    assert types.sum().item() == 16 and types[0, -1].item() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_example_without_image(tiny_models, family):
    _, processor = tiny_models.load(family)
    enc = encode_example(processor, text_only_record(), None)
    assert "pixel_values" not in enc
    labelled = enc["input_ids"][0][enc["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == RESPONSE_TEXT[family].format(answer="two")


# ----------------------------------------------------------------------------------------------- collate


def toy_example(length: int, first: int, *, with_types: bool = True) -> dict[str, torch.Tensor]:
    ids = torch.arange(first, first + length).unsqueeze(0)
    labels = ids.clone()
    labels[:, : length // 2] = IGNORE_INDEX
    example = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.full((1, 3, 4, 4), float(first)),
        "labels": labels,
    }
    if with_types:
        example["token_type_ids"] = torch.ones_like(ids)
    return example


def test_collate_right_padding():
    short, long = toy_example(3, 10), toy_example(5, 20)
    batch = collate([short, long], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [20, 21, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, -100], [-100, -100, 22, 23, 24]]
    assert batch["token_type_ids"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(batch["pixel_values"], torch.cat([short["pixel_values"], long["pixel_values"]]))


def test_collate_left_padding():
    short, long = toy_example(3, 10), toy_example(5, 20)
    batch = collate([long, short], pad_token_id=7, side="left")
    assert batch["input_ids"].tolist() == [[20, 21, 22, 23, 24], [7, 7, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 22, 23, 24], [-100, -100, -100, 11, 12]]
    assert batch["token_type_ids"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [20.0, 10.0]


def test_collate_keeps_dtypes_and_equal_lengths_unpadded():
    a, b = toy_example(4, 1), toy_example(4, 9)
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].all()
    assert batch["input_ids"].dtype == torch.int64 and batch["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_real_examples_of_different_lengths(tiny_models, train_data, family):
    _, processor = tiny_models.load(family)
    records = sorted(train_data.records[:8], key=lambda r: len(r.query))[::7]  # shortest and longest
    examples = [encode_example(processor, r, train_data.load_image(r)) for r in records]
    lengths = [e["input_ids"].shape[1] for e in examples]
    assert lengths[0] != lengths[1]
    pad = processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        batch = collate(examples, pad, side=side)
        assert batch["input_ids"].shape == (2, max(lengths))
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        assert ((batch["attention_mask"] == 0) == (batch["input_ids"] == pad)).all()
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert set(batch) == set(examples[0])
        assert batch["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "image-first"])
def test_collate_mixes_image_and_text_only_examples(tiny_models, train_data, text_first):
    """LLaVA-format data may hold text-only records beside image ones (data.Record.image is optional), so
    a batch can mix both: the images of the image records must reach the model."""
    model, processor = tiny_models.load("llava")
    record = train_data.records[0]
    with_image = encode_example(processor, record, train_data.load_image(record))
    text_only = encode_example(processor, text_only_record(), None)
    examples = [text_only, with_image] if text_first else [with_image, text_only]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    assert torch.equal(batch["pixel_values"], with_image["pixel_values"])
    assert (batch["input_ids"] == model.config.image_token_id).sum().item() == 64


# -------------------------------------------------------------------------------------- full fine-tuning


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_lowers_the_loss(tiny_models, train_data, family):
    model, processor = tiny_models.load(family)
    total = sum(p.numel() for p in model.parameters())
    trained, result = finetune(model, processor, train_data, quick_config())
    assert len(result.losses) == 8
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.2
    assert result.trainable_parameters == total
    assert not trained.training


def test_finetune_is_deterministic_for_a_seed(tiny_models, train_data):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        model, processor = tiny_models.load("gemma3")
        trained, result = finetune(model, processor, train_data, quick_config(seed=seed))
        runs[name] = (result.losses, trained.state_dict())
    assert runs["a"][0] == runs["b"][0]
    assert all(torch.equal(value, runs["b"][1][key]) for key, value in runs["a"][1].items())
    assert runs["a"][0] != runs["other"][0]


def test_full_finetune_can_freeze_the_vision_tower(tiny_models, train_data):
    model, processor = tiny_models.load("llava")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    vision = {n for n in before if "vision_tower" in n}
    trained, result = finetune(model, processor, train_data, quick_config(train_vision_tower=False))
    after = dict(trained.named_parameters())
    assert vision and all(torch.equal(after[n], before[n]) for n in vision)
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert result.trainable_parameters == sum(p.numel() for n, p in before.items() if n not in vision)


def test_finetune_on_images_mixed_with_text_only_records(tiny_models, train_data):
    model, processor = tiny_models.load("llava")
    records = [*train_data.records[:5], text_only_record()]
    _, result = finetune(model, processor, Dataset(records), quick_config(batch_size=6))
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()


def test_finetune_empty_dataset_raises(tiny_models):
    model, processor = tiny_models.load("llava")
    with pytest.raises(ValueError, match="empty dataset"):
        finetune(model, processor, Dataset([]), quick_config())


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tiny_models, train_data, tmp_path):
    model, processor = tiny_models.load("gemma3")
    config = quick_config(epochs=0.5)
    trained, result = finetune(model, processor, train_data, config, tmp_path / "ckpt")
    out = tmp_path / "ckpt"
    assert result.output_dir == out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    summary = json.loads((out / "tcapguard_finetune.json").read_text())
    assert summary["losses"] == result.losses and len(result.losses) == 4
    assert summary["config"] == config.to_dict()
    assert summary["trainable_parameters"] == result.trainable_parameters
    reloaded, reprocessor = load_model(out)
    assert reprocessor.chat_template == processor.chat_template
    batch = encoded_batch(processor, train_data)
    assert torch.equal(logits(reloaded, batch), logits(trained, batch))


def test_checkpoint_killed_while_saving_leaves_nothing(tiny_models, train_data, tmp_path, monkeypatch):
    """A save that dies midway leaves neither a half checkpoint nor temp dirs, and an old one intact."""
    model, processor = tiny_models.load("llava")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("previous checkpoint")

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(processor), "save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, processor, train_data, quick_config(epochs=0.25), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


# -------------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_only_adapters_and_projector(tiny_models, train_data, family):
    model, processor = tiny_models.load(family)
    total = sum(p.numel() for p in model.parameters())
    config = quick_config(method="lora", save="adapter", lora_r=4)
    peft_model, result = finetune(model, processor, train_data, config)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "multi_modal_projector" in n for n in trainable), sorted(trainable)
    assert any("lora_A" in n and "language_model" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert result.trainable_parameters == sum(p.numel() for p in trainable.values())
    assert result.trainable_parameters < total / 5


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merged_save_is_a_plain_model(tiny_models, train_data, family, tmp_path):
    model, processor = tiny_models.load(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = quick_config(method="lora", lora_r=4)
    merged, _ = finetune(model, processor, train_data, config, tmp_path / "merged")
    after = dict(merged.named_parameters())
    assert after.keys() == before.keys()
    vision = [n for n in before if "vision_tower" in n]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision)
    for changed in ("multi_modal_projector", "self_attn.q_proj"):
        names = [n for n in before if changed in n and n.endswith("weight")]
        assert names and any(not torch.equal(after[n], before[n]) for n in names), changed
    embed = next(n for n in before if n.endswith("embed_tokens.weight"))
    assert torch.equal(after[embed], before[embed])

    out = tmp_path / "merged"
    assert not (out / "adapter_config.json").exists()
    saved = load_file(out / "model.safetensors")
    assert not [k for k in saved if any(marker in k for marker in PEFT_MARKERS)]
    reloaded, _ = load_model(out)
    batch = encoded_batch(processor, train_data)
    torch.testing.assert_close(logits(reloaded, batch), logits(merged, batch))


def test_lora_adapter_save(tiny_models, train_data, tmp_path):
    from peft import PeftModel

    model, processor = tiny_models.load("llava")
    config = quick_config(method="lora", save="adapter", lora_r=4)
    peft_model, result = finetune(model, processor, train_data, config, tmp_path / "adapter")
    out = tmp_path / "adapter"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert not (out / "model.safetensors").exists()
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("multi_modal_projector" in k for k in weights)
    assert sum(v.numel() for v in weights.values()) == result.trainable_parameters
    assert json.loads((out / "tcapguard_finetune.json").read_text())["config"]["save"] == "adapter"

    base, _ = tiny_models.load("llava")
    restored = PeftModel.from_pretrained(base, out)
    batch = encoded_batch(processor, train_data)
    torch.testing.assert_close(logits(restored, batch), logits(peft_model, batch))


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "qlora"}, "method must be one of"),
        ({"save": "full"}, "save must be one of"),
        ({"dtype": "float16"}, "float16.* needs a GPU and loss scaling"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"method": "full", "save": "adapter"}, "needs method='lora'"),
        ({"epochs": 0}, "must be positive"),
        ({"epochs": -1.5}, "must be positive"),
        ({"batch_size": 0}, "must be positive"),
        ({"learning_rate": 0.0}, "must be positive"),
    ],
)
def test_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_finetune_refuses_cuda_without_gpu(tiny_models, train_data, tmp_path):
    model, processor = tiny_models.load("llava")
    for device in ("cuda", "cuda:0"):
        config = quick_config(device=device)  # a GPU job's config still loads on a CPU machine
        with pytest.raises(ValueError, match="no CUDA GPU"):
            finetune(model, processor, train_data, config, tmp_path / "out")


def test_config_to_dict_round_trips():
    config = FinetuneConfig(method="lora", save="adapter", lora_target_modules=["q_proj"], extra={"a": 1})
    assert FinetuneConfig(**config.to_dict()) == config


# ------------------------------------------------------------------------------ robust fine-tuning


def grid_image(seed: int = 0) -> torch.Tensor:
    """[2, 3, 8, 12] images whose 2x2 patches (a 4x6 grid) are all distinct."""
    return torch.rand((2, 3, 8, 12), generator=torch.Generator().manual_seed(seed))


def patches(x: torch.Tensor, size: int = 2) -> torch.Tensor:
    """[n, cells, c*size*size] in row-major grid order."""
    n, c, h, w = x.shape
    return (
        x.reshape(n, c, h // size, size, w // size, size)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(n, -1, c * size * size)
    )


@pytest.mark.parametrize("mode", ["shuffle", "mask", "drop"])
def test_patch_augment_keeps_the_grid_and_is_seeded(mode):
    x = grid_image()
    out = patch_augment(x, patch_size=2, ratio=0.5, mode=mode, generator=torch.Generator().manual_seed(1))
    again = patch_augment(x, patch_size=2, ratio=0.5, mode=mode, generator=torch.Generator().manual_seed(1))
    other = patch_augment(x, patch_size=2, ratio=0.5, mode=mode, generator=torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, again) and not torch.equal(out, other)
    before, after = patches(x), patches(out)
    changed = (before != after).any(-1)
    assert changed.sum(1).tolist() == [12, 12]  # round(0.5 * 24) cells per image, each one changed
    if mode == "shuffle":  # the same patches, moved: multiset of patch contents unchanged
        for n in range(2):
            assert sorted(map(tuple, before[n].tolist())) == sorted(map(tuple, after[n].tolist()))
    elif mode == "mask":
        means = x.mean(dim=(2, 3))  # per image and channel
        filled = after.reshape(2, 24, 3, 4)[changed]
        assert torch.allclose(filled, means.repeat_interleave(12, 0)[:, :, None].expand(-1, -1, 4))
    else:
        assert (after[changed] == 0).all()
    assert torch.equal(x, grid_image())  # input untouched


def test_patch_augment_five_dims_and_errors():
    tiles = torch.rand(2, 3, 3, 8, 8)  # LLaVA-NeXT style [images, tiles, C, H, W]
    assert patch_augment(tiles, patch_size=4, ratio=0.25).shape == tiles.shape
    with pytest.raises(ValueError, match="not a multiple of patch_size 3"):
        patch_augment(tiles, patch_size=3, ratio=0.5)
    with pytest.raises(ValueError, match=r"\[\.\.\., C, H, W\]"):
        patch_augment(torch.rand(16, 48), patch_size=4, ratio=0.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        patch_augment(tiles, patch_size=4, ratio=0.5, mode="blur")


def test_vision_patch_size_reads_the_model_config(tiny_models, small_tiny_config):
    model, _ = tiny_models.load("llava")
    assert vision_patch_size(model) == small_tiny_config("llava").patch_size


def robust_step(model, processor, dataset, robust: RobustConfig, *, lr: float = 1e-3) -> tuple[dict, dict]:
    """One SGD step on the robust terms alone (CE excluded); the regulariser's logs before and after."""
    batch = collate(
        [encode_example(processor, r, dataset.load_image(r)) for r in dataset.records[:6]],
        processor.tokenizer.pad_token_id,
    )
    regularizer = CrossViewRegularizer(robust, seed=0)
    regularizer.attach(model)
    model.train()
    model(**batch)
    loss = regularizer(batch)
    before = dict(regularizer.last)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad.sign()  # sign-SGD: a clear step even where gradients are small
    model.zero_grad()
    regularizer.generator.manual_seed(0)  # the same augmented view as before the step
    model(**batch)
    regularizer(batch)
    after = dict(regularizer.last)
    regularizer.release()
    return before, after


def test_hinge_term_pushes_the_views_apart(tiny_models, train_data):
    model, processor = tiny_models.load("llava")
    robust = RobustConfig(
        margin=1.0,
        margin_reference="fixed",
        gate=0.0,
        entropy_weight=0.0,
        cross_view_weight=1.0,
        detach_augmented=False,
    )
    before, after = robust_step(model, processor, train_data, robust)
    assert before["cross_view_distance"] < 1.0  # below the margin: the hinge is active
    assert after["cross_view_distance"] > before["cross_view_distance"]


def test_batch_median_margin_keeps_gating_the_most_invariant_samples():
    """Once every view pair is further apart than the fixed margin, the fixed hinge is off for all; the
    batch-relative one still gates and pushes the samples below the batch's median distance."""
    distance = torch.tensor([0.9, 0.8, 0.6, 0.95], requires_grad=True)
    hinge, invariance = cross_view_hinge(distance, RobustConfig(margin=0.5, margin_reference="fixed"))
    assert (hinge == 0).all() and (invariance == 0).all()
    relative = RobustConfig(margin=0.5, margin_reference="batch_median")
    hinge, invariance = cross_view_hinge(distance, relative)
    assert torch.allclose(invariance, torch.tensor([0.0, 0.05, 0.25, 0.0]) / 0.85)  # median 0.85
    assert not invariance.requires_grad
    hinge.sum().backward()
    assert distance.grad.tolist() == [0.0, -1.0, -1.0, 0.0]  # only the samples below it are pushed
    same, _ = cross_view_hinge(distance, relative, images=False)  # no image: the fixed margin
    assert (same == 0).all()


def test_reference_margin_gates_only_what_became_more_invariant_than_the_reference_model():
    """Per sample, the margin is the reference model's distance: a sample whose views the fine-tune
    brought closer than the reference had them is gated and pushed in proportion; one that was as
    invariant before (a colour survives a shuffle) or is less invariant now is left alone."""
    distance = torch.tensor([0.05, 0.02, 0.4, 0.0], requires_grad=True)
    reference = torch.tensor([0.6, 0.02, 0.1, 0.0])
    hinge, invariance = cross_view_hinge(distance, RobustConfig(), reference=reference)
    assert torch.allclose(invariance, torch.tensor([0.55 / 0.6, 0.0, 0.0, 0.0]))
    hinge.sum().backward()
    assert distance.grad.tolist() == [-1.0, 0.0, 0.0, 0.0]  # only the first is pushed apart
    with pytest.raises(ValueError, match="needs the reference model's distances"):
        cross_view_hinge(distance, RobustConfig())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reference_model_is_the_model_as_it_was_when_fine_tuning_started(tiny_models, train_data, method):
    """At the first step the model is its own reference (nothing gated); after training steps the
    reference still answers as before (a frozen copy, or for LoRA the adapters switched off)."""
    model, processor = tiny_models.load("llava")
    model = prepare_model(model, FinetuneConfig(method=method, lora_r=4))
    batch = collate(
        [encode_example(processor, r, train_data.load_image(r)) for r in train_data.records[:6]],
        processor.tokenizer.pad_token_id,
    )
    regularizer = CrossViewRegularizer(RobustConfig(), seed=0)
    regularizer.attach(model)
    model.train()
    model(**batch)
    regularizer(batch)
    first = dict(regularizer.last)
    assert first["reference_distance"] == pytest.approx(first["cross_view_distance"], abs=1e-5)
    assert first["invariance"] == pytest.approx(0.0, abs=1e-4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    regularizer.generator.manual_seed(0)  # the same views as at the first step
    model(**batch)
    regularizer(batch)
    regularizer.release()
    assert regularizer.last["reference_distance"] == pytest.approx(first["reference_distance"], abs=1e-5)
    assert abs(regularizer.last["cross_view_distance"] - first["cross_view_distance"]) > 1e-3


def test_detached_hinge_moves_the_original_answer_away_from_the_augmented_one(tiny_models, train_data):
    """With ``detach_augmented`` the augmented view is a fixed reference: a step moves the original
    view's answer away from where the augmented view's answer was (both views may move together,
    so the distance between them need not grow)."""
    model, processor = tiny_models.load("llava")
    batch = collate(
        [encode_example(processor, r, train_data.load_image(r)) for r in train_data.records[:6]],
        processor.tokenizer.pad_token_id,
    )
    robust = RobustConfig(
        margin=1.0, margin_reference="fixed", gate=0.0, entropy_weight=0.0, detach_augmented=True
    )
    regularizer = CrossViewRegularizer(robust, seed=0)
    regularizer.attach(model)
    model.train()
    original = model(**batch).logits
    regularizer(batch).backward()
    regularizer.release()
    labels = batch["labels"]
    augmented = patch_augment(
        batch["pixel_values"],
        patch_size=vision_patch_size(model),
        ratio=robust.patch_ratio,
        mode=robust.augmentation,
        generator=torch.Generator().manual_seed(0),  # the regulariser's view
    )
    with torch.no_grad():
        log_q, mask = response_distributions(model(**{**batch, "pixel_values": augmented}).logits, labels)
        before = cross_view_distance(response_distributions(original, labels)[0], log_q, mask)
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad.sign()
        after = cross_view_distance(response_distributions(model(**batch).logits, labels)[0], log_q, mask)
    model.zero_grad()
    assert after.mean() > before.mean()


@pytest.mark.parametrize("detach", [False, True])
def test_detach_augmented_runs_the_augmented_view_without_gradient(tiny_models, train_data, detach):
    model, processor = tiny_models.load("llava")
    batch = collate(
        [encode_example(processor, r, train_data.load_image(r)) for r in train_data.records[:4]],
        processor.tokenizer.pad_token_id,
    )
    regularizer = CrossViewRegularizer(RobustConfig(detach_augmented=detach))
    regularizer.attach(model)
    tracked = []
    hook = model.register_forward_hook(lambda _m, _i, out: tracked.append(out.logits.requires_grad))
    model.train()
    model(**batch)
    regularizer(batch).backward()
    hook.remove()
    regularizer.release()
    model.zero_grad()
    assert tracked == [True, not detach]  # the original view always carries gradient


def test_entropy_term_lowers_the_entropy(tiny_models, train_data):
    model, processor = tiny_models.load("llava")
    robust = RobustConfig(gate=0.0, cross_view_weight=0.0, entropy_weight=1.0, entropy_max=0.0)
    before, after = robust_step(model, processor, train_data, robust)
    assert before["entropy"] > 0.0 and after["entropy"] < before["entropy"]


def test_gate_switches_off_the_loss_of_fully_invariant_samples(tiny_models):
    """On blank images a patch shuffle changes nothing, so both views agree exactly (d = 0): with
    gate=1 their cross-entropy is removed entirely and its gradient with it."""
    model, processor = tiny_models.load("gemma3")
    record = world.make_split(1, seed=3).records[0]
    blank = Image.new("RGB", (32, 32), (90, 90, 90))
    batch = collate([encode_example(processor, record, blank)] * 2, processor.tokenizer.pad_token_id)
    robust = RobustConfig(
        augmentation="shuffle", margin_reference="fixed", gate=1.0, cross_view_weight=0.0, entropy_weight=0.0
    )
    regularizer = CrossViewRegularizer(robust)
    regularizer.attach(model)
    assert not list(regularizer.parameters())  # the model is not a submodule: no parameter twice
    ce = model(**batch).loss
    correction = regularizer(batch)
    assert regularizer.last["cross_view_distance"] == 0.0 and regularizer.last["ce_weight"] == 0.0
    assert ce.item() > 0.5
    torch.testing.assert_close(ce + correction, torch.zeros(()), atol=1e-5, rtol=0)
    half = CrossViewRegularizer(replace(robust, gate=0.5))
    half.attach(model)
    ce = model(**batch).loss
    torch.testing.assert_close(ce + half(batch), 0.5 * ce, atol=1e-5, rtol=1e-4)
    regularizer.release()
    half.release()
    assert not model._forward_hooks


def test_several_views_average_the_hinge_and_take_the_largest_invariance(tiny_models, train_data):
    """Two views in one regulariser equal each view run alone on the same patches: the hinge (and
    the logged distance) is their mean, a sample's invariance the larger of the two."""
    model, processor = tiny_models.load("llava")
    model.eval()
    batch = collate(
        [encode_example(processor, r, train_data.load_image(r)) for r in train_data.records[:1]],
        processor.tokenizer.pad_token_id,
    )
    fixed = {"margin": 1.0, "margin_reference": "fixed", "gate": 0.0, "entropy_weight": 0.0}

    def run(robust: RobustConfig, state: torch.Tensor | None = None) -> CrossViewRegularizer:
        regularizer = CrossViewRegularizer(robust, seed=0)
        if state is not None:
            regularizer.generator.set_state(state)
        regularizer.attach(model)
        model(**batch)
        regularizer.loss = regularizer(batch).item()
        regularizer.release()
        return regularizer

    both = run(RobustConfig(augmentation=["mask", "shuffle"], patch_ratio=[0.25, 0.5], **fixed))
    mask = run(RobustConfig(augmentation="mask", patch_ratio=0.25, **fixed))
    shuffle = run(RobustConfig(augmentation="shuffle", patch_ratio=0.5, **fixed), mask.generator.get_state())
    views = (mask.last, shuffle.last)
    assert mask.last["cross_view_distance"] != shuffle.last["cross_view_distance"]
    assert both.loss == pytest.approx((mask.loss + shuffle.loss) / 2, rel=1e-5)
    assert both.last["cross_view_distance"] == pytest.approx(
        sum(v["cross_view_distance"] for v in views) / 2, rel=1e-5
    )
    assert both.last["invariance"] == pytest.approx(max(v["invariance"] for v in views), rel=1e-5)


def test_robust_config_views_pair_augmentations_with_ratios():
    assert RobustConfig().views == [("mask", 0.25)]
    assert RobustConfig(augmentation=["mask", "shuffle"], patch_ratio=[0.25, 0.5]).views == [
        ("mask", 0.25),
        ("shuffle", 0.5),
    ]
    assert RobustConfig(augmentation=["mask", "drop"], patch_ratio=0.5).views == [
        ("mask", 0.5),
        ("drop", 0.5),
    ]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_robust_finetune_runs_end_to_end(tiny_models, train_data, method, tmp_path):
    model, processor = tiny_models.load("llava")
    config = quick_config(method=method, lora_r=4, robust=RobustConfig(augmentation="mask"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained, result = finetune(model, processor, train_data, config, tmp_path / "robust")
    assert not [w for w in caught if "duplicate parameters" in str(w.message)]  # each parameter once
    assert len(result.losses) == 8 and all(torch.isfinite(torch.tensor(result.losses)))
    assert set(result.terms) == {
        "cross_view_distance",
        "invariance",
        "ce_weight",
        "entropy",
        "reference_distance",
    }
    assert all(len(v) == 8 for v in result.terms.values())
    assert all(0.0 <= v <= 1.0 for v in result.terms["cross_view_distance"])
    assert not trained._forward_hooks  # the regulariser's hook is gone

    summary = json.loads((tmp_path / "robust" / "tcapguard_finetune.json").read_text())
    assert summary["config"]["robust"]["augmentation"] == "mask"
    assert FinetuneConfig.from_dict(summary["config"]) == config
    assert summary["terms"]["entropy"] == result.terms["entropy"]


def test_robust_finetune_differs_from_plain_and_is_deterministic(tiny_models, train_data):
    runs = []
    for robust in (None, RobustConfig(), RobustConfig()):
        model, processor = tiny_models.load("gemma3")
        _, result = finetune(model, processor, train_data, quick_config(epochs=0.5, robust=robust))
        runs.append(result.losses)
    assert runs[1] == runs[2] and runs[0] != runs[1]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"augmentation": "blur"}, "augmentation must be one of"),
        ({"augmentation": []}, "augmentation must be one of"),
        ({"augmentation": ["mask", "blur"]}, "augmentation must be one of"),
        ({"augmentation": ["mask", "shuffle"], "patch_ratio": [0.25, 0.5, 0.5]}, "one per augmentation"),
        ({"augmentation": ["mask", "shuffle"], "patch_ratio": [0.25, 0.0]}, "patch_ratio must be in"),
        ({"patch_ratio": 0.0}, "patch_ratio must be in"),
        ({"patch_size": 0}, "patch_size must be positive"),
        ({"margin": 1.5}, "margin must be in"),
        ({"gate": 2.0}, "gate must be in"),
        ({"margin_reference": "mean"}, "margin_reference must be one of"),
        ({"entropy_weight": -1.0}, "entropy_weight must be >= 0"),
    ],
)
def test_robust_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        RobustConfig(**settings)


def test_robust_config_round_trips_through_finetune_config():
    config = FinetuneConfig(robust=RobustConfig(patch_size=8, margin=0.3))
    assert FinetuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    views = FinetuneConfig(robust=RobustConfig(augmentation=["mask", "shuffle"], patch_ratio=[0.25, 0.5]))
    assert FinetuneConfig.from_dict(json.loads(json.dumps(views.to_dict()))) == views
    assert FinetuneConfig(**config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown RobustConfig field\(s\) \['weight'\]"):
        FinetuneConfig.from_dict({"robust": {"weight": 1}})
    with pytest.raises(ValueError, match="must be a RobustConfig"):
        FinetuneConfig(robust=0.5)

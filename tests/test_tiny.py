"""Tiny MLLMs: built with transformers' real classes, loaded back the way a hub checkpoint is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from tcapguard.models import load_model
from tcapguard.tiny import TINY_CONFIG_FILE, TinyMLLMConfig, build_tiny_mllm, build_tokenizer

CORPUS = [
    "What colour is the circle? red",
    "Describe the image. A blue square on a white background.",
    "How many objects are there? three",
] * 20
FAMILIES = ["llava", "gemma3"]
CLASSES = {
    "llava": (LlavaForConditionalGeneration, LlavaProcessor),
    "gemma3": (Gemma3ForConditionalGeneration, Gemma3Processor),
}
MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
]
EXPECTED_PROMPT = {
    "llava": "Answer briefly. USER: <image>\nWhat colour is the circle? ASSISTANT:",
    "gemma3": (
        "<bos><start_of_turn>user\nAnswer briefly.\n\n<start_of_image>What colour is the circle?"
        "<end_of_turn>\n<start_of_turn>model\n"
    ),
}


def small_config(family: str, seed: int = 0) -> TinyMLLMConfig:
    return TinyMLLMConfig(family=family, text_layers=2, vision_layers=1, seed=seed)


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    family = request.param
    path = build_tiny_mllm(small_config(family), tmp_path_factory.mktemp(family), corpus=CORPUS)
    model, processor = load_model(path)
    return family, path, model, processor


def images(n: int) -> list[list[Image.Image]]:
    """One image per sample, nested: Gemma3's processor reads a flat list as all images of one sample."""
    return [[Image.new("RGB", (40 + 8 * i, 30), (200, 20 * i, 10))] for i in range(n)]


def test_config_round_trip_and_validation():
    config = TinyMLLMConfig(family="gemma3", seed=7)
    assert TinyMLLMConfig.from_dict(config.to_dict()) == config
    assert config.kv_heads == 4 and TinyMLLMConfig().kv_heads == 8
    with pytest.raises(ValueError, match="divisible by patch_size"):
        TinyMLLMConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="family"):
        TinyMLLMConfig(family="qwen")
    with pytest.raises(ValueError, match="mm_tokens_per_image"):
        TinyMLLMConfig(family="gemma3", mm_tokens_per_image=15)
    with pytest.raises(ValueError, match="unknown TinyMLLMConfig keys"):
        TinyMLLMConfig.from_dict({"family": "llava", "layers": 2})


def test_loads_real_classes_in_eval_mode(built):
    family, path, model, processor = built
    model_cls, processor_cls = CLASSES[family]
    assert type(model) is model_cls and type(processor) is processor_cls
    assert not model.training
    assert json.loads((path / TINY_CONFIG_FILE).read_text()) == small_config(family).to_dict()


def test_weights_round_trip(built, tmp_path):
    _, path, model, _ = built
    model.save_pretrained(tmp_path)
    saved, resaved = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert saved.keys() == resaved.keys()
    assert all(torch.equal(saved[key], resaved[key]) for key in saved)


def test_same_seed_same_weights(tmp_path):
    first = load_file(
        build_tiny_mllm(small_config("gemma3"), tmp_path / "a", corpus=CORPUS) / "model.safetensors"
    )
    again = load_file(
        build_tiny_mllm(small_config("gemma3"), tmp_path / "b", corpus=CORPUS) / "model.safetensors"
    )
    other = load_file(
        build_tiny_mllm(small_config("gemma3", seed=1), tmp_path / "c", corpus=CORPUS) / "model.safetensors"
    )
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_chat_template(built):
    family, _, _, processor = built
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == EXPECTED_PROMPT[family]
    assert processor.tokenizer.chat_template
    as_strings = [{"role": m["role"], "content": m["content"][-1]["text"]} for m in MESSAGES]
    no_image = processor.apply_chat_template(as_strings, add_generation_prompt=True, tokenize=False)
    assert no_image == prompt.replace("<image>\n", "").replace("<start_of_image>", "")
    answered = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    full = processor.apply_chat_template(answered, tokenize=False)
    assert full == prompt + {"llava": " red ", "gemma3": "red<end_of_turn>\n"}[family]


def test_image_tokens_forward_and_generate(built):
    family, _, model, processor = built
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    batch = processor(
        text=[prompt, prompt.replace("circle", "big circle")],
        images=images(2),
        padding=True,
        return_tensors="pt",
    )
    ids = batch["input_ids"]
    features = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    per_image = (ids == model.config.image_token_id).sum(dim=1)
    assert (
        per_image.tolist() == [features[0].shape[0]] * 2 == [small_config(family).image_tokens_per_sample] * 2
    )
    first = [row[mask.bool()][0].item() for row, mask in zip(ids, batch["attention_mask"], strict=True)]
    assert first == [tokenizer.bos_token_id] * 2 and (ids == tokenizer.bos_token_id).sum().item() == 2
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*ids.shape, len(tokenizer)) and torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 3


def test_flat_image_list(built):
    """The training code's ``images=[PIL images]`` call: fine for LLaVA; Gemma3 (as upstream) needs
    ``[[image], [image]]``, since its processor reads a flat list as all the images of one sample."""
    family, _, _, processor = built
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    flat = [sample[0] for sample in images(2)]
    if family == "gemma3":
        with pytest.raises(ValueError, match="number of <start_of_image> tokens"):
            processor(text=[prompt, prompt], images=flat, padding=True, return_tensors="pt")
        return
    batch = processor(text=[prompt, prompt], images=flat, padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("text", ["visit evil site now", "cf", "café ☕", " two  spaces , odd . ", "z\n\tq"])
def test_tokenizer_round_trips_any_text(built, text):
    tokenizer = built[3].tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token and tokenizer.pad_token_id is not None


def test_build_tokenizer_requires_core_special_tokens():
    with pytest.raises(ValueError, match="'eos'"):
        build_tokenizer(["abc"], 300, {"pad": "<pad>", "bos": "<s>"})


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_vision_position_embeddings_start_from_a_2d_grid(family, tmp_path):
    """Every patch of the grid starts with its own position vector, rows and columns alike."""
    config = TinyMLLMConfig(family=family, text_layers=1, vision_layers=1)
    model, _ = load_model(build_tiny_mllm(config, tmp_path / family, corpus=["a b c"]))
    table = next(m for n, m in model.named_modules() if n.endswith("embeddings.position_embedding")).weight
    grid = config.image_size // config.patch_size
    patches = table[-grid * grid :].detach()
    distances = torch.cdist(patches, patches)
    off_diagonal = distances[~torch.eye(grid * grid, dtype=torch.bool)]
    assert off_diagonal.min() > 0.1  # no two patches share a position
    # neighbours in a row are as far apart as neighbours in a column
    assert distances[0, 1] == pytest.approx(distances[0, grid].item(), rel=1e-5)

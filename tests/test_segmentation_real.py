"""Segmentation through the real processors and chat templates of the families TCAP targets.

No hub checkpoint is reachable here, so each family's REAL transformers processor class is built around
a small byte-level BPE tokenizer that carries the family's special tokens (trained like the tiny
worlds' tokenizer, :func:`tcapguard.tiny.build_tokenizer`), the family's real image processor (PIL
backend, tiny image sizes) and the family's REAL chat template string (source cited at each one). Only
the vocabulary is small; the rendering, placeholder expansion and tokenization are the families' own.

For every family, :func:`tcapguard.profiling.segment` must give: text = exactly the user query, vision
= exactly the positions of the image token, as many as the processor says one image takes
(``_get_num_multimodal_tokens``, a separate code path from the expansion), everything else system,
with the system prompt in system.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import PreTrainedTokenizerFast

from tcapguard.data import Record, Turn
from tcapguard.profiling import SYSTEM, TEXT, VISION, SegmentationError, segment
from tcapguard.tiny import GEMMA3_SPECIAL_TOKENS, LLAVA_SPECIAL_TOKENS, build_tokenizer
from tcapguard.training import encode_example, render_prompt
from test_training import labelled_spans

# ------------------------------------------------------------------------------------ real templates

# llava-hf/llava-1.5-7b-hf (and llava-v1.6-vicuna) chat_template.json, as quoted verbatim in
# openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp (chat_template_fallback_map, comment
# "llava-1.5, llava-v1.6-vicuna (chat_template.json)").
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json (LLaVA-NeXT), same source (comment
# "tiny-random-llava-next, llava-v1.6-mistral (chat_template.json)"). It has no generation prompt: the
# prompt ends with " [/INST]".
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
    "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] "
    "| selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen/Qwen2-VL-2B-Instruct tokenizer_config.json (Qwen2.5-VL ships the same template), same source
# (comment "Qwen2-VL-2B-Instruct (tokenizer_config.json)").
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen3-VL-*-Thinking chat_template (render_content macro; tools branch, reasoning and tool-call
# handling of assistant turns left out since no prompt here has them), as reproduced in public agent code
# found by code search for "macro render_content(content, do_vision_count)". The generation prompt opens
# a <think> block.
QWEN3_VL_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, True) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n<think>\\n' }}
{%- endif %}
"""

# HuggingFaceM4/Idefics3-8B-Llama3 chat template, as used by transformers'
# tests/models/idefics3/test_processing_idefics3.py (prepare_processor_dict), with the Llama-3 bos of the
# hub checkpoint's template. The image comes straight after "User:" (no space), text follows the image.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}{% if "
    "message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in "
    "message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}"
    "{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)

# google/gemma-3-*-it chat template: transformers src/transformers/models/gemma3/convert_gemma3_weights.py
# (_CHAT_TEMPLATE). The system prompt is folded into the first user turn.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# OpenGVLab/InternVL3-*-hf chat template as used with transformers 5, whose InternVLProcessor expands the
# context token itself (<IMG_CONTEXT> -> <img><IMG_CONTEXT>*n</img>): the template of transformers'
# src/transformers/models/internvl/convert_internvl_weights_to_hf.py (chat_template) with the placeholder
# '<IMG_CONTEXT>\n' instead of the older '<image>\n' (which this processor no longer expands), as in the
# InternVL-hf fine-tuning code found by code search for "{{ '<IMG_CONTEXT>\n' }}".
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# ------------------------------------------------------------------------------------ processor builders

CORPUS = [
    "You are a careful visual assistant. Answer with one word. What colour is the square in the picture? "
    "How many circles are left of the red triangle? system user assistant model Picture Video"
] * 4
QUERY = "What colour is the square in the picture?"
SYSTEM_PROMPT = "You are a careful visual assistant. Answer with one word."


def _tokenizer(
    specials: dict[str, str], attributes: dict[str, str], *, add_bos: bool
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the family's special tokens (:func:`tcapguard.tiny.build_tokenizer`);
    ``attributes`` are the family-specific token attributes its processor reads (``image_token``,
    ``start_image_token``, ``context_image_token`` ...)."""
    return build_tokenizer(CORPUS, 400, specials, add_bos_token=add_bos, token_attributes=attributes)


def _video_processor(**settings):
    """A stand-in for the video processor some processor classes insist on (never used: no videos here).

    transformers' video processors need torchvision, which cannot be installed next to this torch build
    (notes/ecosystem.md section 8). A bare ``VideoProcessorMixin`` (the base class that the processors'
    argument check asks for) imports and builds fine without it; any video input would fail, which is fine
    because the segmentation under test sees images only. ``settings`` are video defaults a processor
    reads even for image-only prompts (SmolVLM's chat template step reads ``num_frames`` and ``fps``).
    """
    from transformers import video_processing_utils

    video_processor = video_processing_utils.VideoProcessorMixin()
    for name, value in settings.items():
        setattr(video_processor, name, value)
    return video_processor


def _with_video_mixin(build: Callable[[], object]) -> object:
    """Build a processor while transformers exports ``VideoProcessorMixin`` for its argument check.

    Without torchvision the class is left out of transformers' namespace (the check then fails with
    ``VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'``); it is exported only while building.
    """
    from transformers import processing_utils, video_processing_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            processing_utils.transformers_module,
            "VideoProcessorMixin",
            video_processing_utils.VideoProcessorMixin,
            raising=False,
        )
        return build()


def _pil(module: str, name: str):
    """The PIL backend of an image processor (the torchvision-backed class needs torchvision)."""
    import importlib

    return getattr(importlib.import_module(f"transformers.models.{module}"), name)


def _expanded_tokens(processor, size: tuple[int, int]) -> int:
    """Image tokens one image of ``size`` takes, by the processor's own count (not its expansion code)."""
    return processor._get_num_multimodal_tokens(image_sizes=[list(size)])["num_image_tokens"][0]


def _tiled_tokens(processor, size: tuple[int, int]) -> int:
    """Idefics3 / SmolVLM: ``image_seq_len`` image tokens per tile (their multimodal count also includes
    the ``<fake_token_around_image>``, ``<row_i_col_j>`` and newline tokens around the tiles)."""
    tiles, _, _ = processor.image_processor.get_number_of_image_patches(*size, {})
    return tiles * processor.image_seq_len


def _context_tokens(processor, size: tuple[int, int]) -> int:
    """InternVL: ``image_seq_length`` context tokens per tile (its multimodal count includes <img></img>)."""
    tiles = processor.image_processor.get_number_of_image_patches(*size, {})
    return tiles * processor.image_seq_length


@dataclass
class Family:
    build: Callable[[], object]
    image_token: str
    image_size: tuple[int, int]  # (height, width) of the test image
    vision_tokens: Callable[[object, tuple[int, int]], int] = _expanded_tokens


def _llava15():
    specials = LLAVA_SPECIAL_TOKENS
    tokenizer = _tokenizer(specials, {"image_token": "<image>"}, add_bos=True)
    clip = _pil("clip.image_processing_pil_clip", "CLIPImageProcessorPil")
    return transformers.LlavaProcessor(
        image_processor=clip(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_TEMPLATE,
    )


def _llava_next():
    specials = LLAVA_SPECIAL_TOKENS
    tokenizer = _tokenizer(specials, {"image_token": "<image>"}, add_bos=True)
    image_processor = _pil("llava_next.image_processing_pil_llava_next", "LlavaNextImageProcessorPil")(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
    )
    return transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_MISTRAL_TEMPLATE,
    )


QWEN_SPECIALS = {
    "pad": "<|endoftext|>",
    "bos": "<|endoftext|>",
    "eos": "<|im_end|>",
    "im_start": "<|im_start|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
}


def _qwen(processor_class: str, template: str, patch_size: int):
    tokenizer = _tokenizer(
        QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, add_bos=False
    )
    image_processor = _pil("qwen2_vl.image_processing_pil_qwen2_vl", "Qwen2VLImageProcessorPil")(
        patch_size=patch_size,
        merge_size=2,
        min_pixels=(4 * patch_size) ** 2,
        max_pixels=(4 * patch_size) ** 2,
    )
    return _with_video_mixin(
        lambda: getattr(transformers, processor_class)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=_video_processor(),
            chat_template=template,
        )
    )


def _idefics3():
    specials = {
        "pad": "<|finetune_right_pad_id|>",
        "bos": "<|begin_of_text|>",
        "eos": "<end_of_utterance>",
        "image": "<image>",
        "fake": "<fake_token_around_image>",
        "global": "<global-img>",
    }
    tokenizer = _tokenizer(specials, {"image_token": "<image>"}, add_bos=False)
    # 56 x 28 image, split into 28-pixel tiles: a 1 x 2 grid of <row_1_col_j> tiles plus the global image.
    image_processor = _pil("idefics3.image_processing_pil_idefics3", "Idefics3ImageProcessorPil")(
        do_image_splitting=True, size={"longest_edge": 56}, max_image_size={"longest_edge": 28}
    )
    return transformers.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )


def _smolvlm():
    pytest.importorskip("num2words", reason="SmolVLMProcessor requires the num2words package (not installed)")
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    specials = {
        "pad": "<|im_end|>",
        "bos": "<|im_start|>",
        "eos": "<end_of_utterance>",
        "image": "<image>",
        "fake": "<fake_token_around_image>",
        "global": "<global-img>",
    }
    tokenizer = _tokenizer(specials, {"image_token": "<image>"}, add_bos=False)
    image_processor = _pil("smolvlm.image_processing_pil_smolvlm", "SmolVLMImageProcessorPil")(
        do_image_splitting=True, size={"longest_edge": 56}, max_image_size={"longest_edge": 28}
    )
    # transformers' own default SmolVLM template (processing_smolvlm.DEFAULT_CHAT_TEMPLATE), which is the
    # HuggingFaceTB/SmolVLM-Instruct template extended with videos.
    return _with_video_mixin(
        lambda: transformers.SmolVLMProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=_video_processor(num_frames=64, fps=1),  # read, never used: no video here
            image_seq_len=4,
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )
    )


def _gemma3():
    specials = GEMMA3_SPECIAL_TOKENS
    attributes = {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    }
    tokenizer = _tokenizer(specials, attributes, add_bos=False)
    image_processor = _pil("gemma3.image_processing_pil_gemma3", "Gemma3ImageProcessorPil")(
        size={"height": 28, "width": 28}
    )
    return transformers.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=GEMMA3_TEMPLATE,
    )


def _internvl():
    specials = {
        "pad": "<|endoftext|>",
        "bos": "<|endoftext|>",
        "eos": "<|im_end|>",
        "im_start": "<|im_start|>",
        "img": "<img>",
        "img_end": "</img>",
        "context": "<IMG_CONTEXT>",
        "video": "<video>",
    }
    attributes = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = _tokenizer(specials, attributes, add_bos=False)
    image_processor = _pil("got_ocr2.image_processing_pil_got_ocr2", "GotOcr2ImageProcessorPil")(
        size={"height": 28, "width": 28}, crop_to_patches=False
    )
    return _with_video_mixin(
        lambda: transformers.InternVLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=_video_processor(),
            image_seq_length=4,
            chat_template=INTERNVL_TEMPLATE,
        )
    )


FAMILIES: dict[str, Family] = {
    "llava-1.5": Family(_llava15, "<image>", (28, 28)),
    "llava-next": Family(_llava_next, "<image>", (28, 56)),
    "qwen2-vl": Family(lambda: _qwen("Qwen2VLProcessor", QWEN2_VL_TEMPLATE, 14), "<|image_pad|>", (56, 56)),
    "qwen2.5-vl": Family(
        lambda: _qwen("Qwen2_5_VLProcessor", QWEN2_VL_TEMPLATE, 14), "<|image_pad|>", (56, 56)
    ),
    "qwen3-vl": Family(lambda: _qwen("Qwen3VLProcessor", QWEN3_VL_TEMPLATE, 16), "<|image_pad|>", (64, 64)),
    "idefics3": Family(_idefics3, "<image>", (28, 56), _tiled_tokens),
    "smolvlm": Family(_smolvlm, "<image>", (28, 56), _tiled_tokens),
    "gemma3": Family(_gemma3, "<image_soft_token>", (28, 28)),
    "internvl": Family(_internvl, "<IMG_CONTEXT>", (28, 28), _context_tokens),
}


@pytest.fixture(scope="module")
def processors() -> dict[str, object]:
    return {}


def _processor(name: str, cache: dict[str, object]):
    if name not in cache:
        cache[name] = FAMILIES[name].build()
    return cache[name]


def _record(system: str | None = SYSTEM_PROMPT, query: str = QUERY, image: bool = True) -> Record:
    prefix = "<image>\n" if image else ""
    turns = [Turn("human", prefix + query), Turn("gpt", "red")]
    return Record("r0", turns, image="image.png" if image else None, system=system)


def _image(size: tuple[int, int]) -> Image.Image:
    height, width = size
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _decode(processor, ids: torch.Tensor, mask: np.ndarray) -> str:
    return processor.tokenizer.decode(ids[torch.from_numpy(mask)], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(FAMILIES))
def test_real_processor_segments_system_vision_text(name, processors):
    family = FAMILIES[name]
    processor = _processor(name, processors)
    record = _record()
    image = _image(family.image_size)
    image_id = processor.tokenizer.convert_tokens_to_ids(family.image_token)
    inputs, components = segment(processor, record, image, {image_id})
    ids = inputs["input_ids"][0]
    assert components.shape == ids.shape
    assert set(np.unique(components)) == {SYSTEM, VISION, TEXT}

    # vision: exactly where the image token is, as many as the processor says one image takes
    assert (np.flatnonzero(components == VISION) == np.flatnonzero(ids.numpy() == image_id)).all()
    assert (components == VISION).sum() == family.vision_tokens(processor, family.image_size) > 0

    # text: exactly the user query, one contiguous run
    text = np.flatnonzero(components == TEXT)
    assert (np.diff(text) == 1).all()
    assert _decode(processor, ids, components == TEXT).strip() == QUERY

    # system: everything else, including the system prompt and the generation prompt
    system = _decode(processor, ids, components == SYSTEM)
    assert SYSTEM_PROMPT in system
    assert QUERY not in system
    prompt = render_prompt(processor, record)
    tail = prompt[prompt.index(QUERY) + len(QUERY) :]
    assert "".join(system.split()).endswith("".join(tail.split()))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_query_repeated_in_the_system_prompt_stays_system(name, processors):
    family = FAMILIES[name]
    processor = _processor(name, processors)
    record = _record(system=f"Example question: {QUERY}")
    image_id = processor.tokenizer.convert_tokens_to_ids(family.image_token)
    inputs, components = segment(processor, record, _image(family.image_size), {image_id})
    ids = inputs["input_ids"][0]
    assert _decode(processor, ids, components == TEXT).strip() == QUERY
    assert QUERY in _decode(processor, ids, components == SYSTEM)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_text_only_prompt_has_no_vision(name, processors):
    family = FAMILIES[name]
    processor = _processor(name, processors)
    image_id = processor.tokenizer.convert_tokens_to_ids(family.image_token)
    inputs, components = segment(processor, _record(image=False), None, {image_id})
    assert VISION not in components
    assert _decode(processor, inputs["input_ids"][0], components == TEXT).strip() == QUERY


def test_processor_without_chat_template_is_a_clear_error(processors):
    processor = _processor("qwen2-vl", processors)
    copied = copy.copy(processor)
    copied.chat_template = None
    copied.tokenizer = copy.copy(processor.tokenizer)
    copied.tokenizer.chat_template = None
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with pytest.raises(SegmentationError, match="no chat template"):
        segment(copied, _record(), _image((56, 56)), {image_id})


def test_wrong_image_token_is_a_clear_error(processors):
    processor = _processor("gemma3", processors)
    # <start_of_image> is Gemma3's placeholder in the template, not the token its image expands into
    boi = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>") + 10_000
    with pytest.raises(SegmentationError, match="no image tokens"):
        segment(processor, _record(), _image((28, 28)), {boi})


class _WithoutReplacementReport:
    """A real processor that does not report its placeholder expansions, as before transformers added
    ``return_text_replacement_offsets``: segmentation must fall back to the unchanged-suffix rule."""

    def __init__(self, processor) -> None:
        self._processor = processor

    def __getattr__(self, name: str):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        kwargs.pop("return_text_replacement_offsets", None)
        encoded = self._processor(*args, **kwargs)
        assert "text_replacement_offsets" not in encoded
        return encoded


@pytest.mark.parametrize("name", ["llava-next", "qwen2-vl", "idefics3", "gemma3", "internvl"])
def test_segmentation_without_a_replacement_report_agrees(name, processors):
    family = FAMILIES[name]
    processor = _processor(name, processors)
    image_id = processor.tokenizer.convert_tokens_to_ids(family.image_token)
    image = _image(family.image_size)
    reported = segment(processor, _record(), image, {image_id})
    inferred = segment(_WithoutReplacementReport(processor), _record(), image, {image_id})
    assert torch.equal(reported[0]["input_ids"], inferred[0]["input_ids"])
    assert (reported[1] == inferred[1]).all()


def test_expanded_span_moves_only_past_earlier_placeholders():
    from tcapguard.profiling import _expanded_span

    record = _record()
    before = {"type": "image", "span": (0, 7), "new_span": (0, 28), "text": "<image>"}  # grows by 21
    after = {"type": "image", "span": (30, 37), "new_span": (51, 72), "text": "<image>"}
    assert _expanded_span(record, 10, 20, [before, after]) == (31, 41)
    assert _expanded_span(record, 10, 20, [after]) == (10, 20)
    with pytest.raises(SegmentationError, match="contains the image placeholder"):
        _expanded_span(record, 5, 20, [before])


# ------------------------------------------------------------------------------- multi-turn training


@pytest.mark.parametrize("name", list(FAMILIES))
def test_multi_turn_record_is_trained_on_every_answer(name, processors):
    """Through each family's real template, a two-exchange record is labelled on both answers (each with
    whatever the template or the trainer ends a turn with) and on nothing else."""
    if name == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor requires the num2words package")
    processor = _processor(name, processors)
    turns = [Turn("human", f"<image>\n{QUERY}"), Turn("gpt", "red"), Turn("human", "And the circle?")]
    record = Record("mt", [*turns, Turn("gpt", "blue")], image="image.png", system=SYSTEM_PROMPT)
    enc = encode_example(processor, record, _image(FAMILIES[name].image_size))
    spans = labelled_spans(enc["labels"][0])
    answers = [processor.tokenizer.decode(span, skip_special_tokens=True) for span in spans]
    assert [a.strip().removesuffix("<\\s>") for a in answers] == ["red", "blue"]  # llava-next: "<\s>" is text
    assert (enc["attention_mask"] == 1).all() and enc["labels"].shape == enc["input_ids"].shape


def test_multi_turn_boundary_survives_a_merge_with_the_next_turn():
    """llava-1.5's template ends an answer with a space; a tokenizer that merges " USER" (a real Llama
    one does) makes the turn's text prefix tokenize differently from the conversation. The turn's tokens
    are found from character offsets, so the answer is still labelled exactly."""
    corpus = ["You are a helper. USER: What colour? ASSISTANT: red USER: And now? ASSISTANT: blue"] * 8
    tokenizer = build_tokenizer(
        corpus, 300, LLAVA_SPECIAL_TOKENS, token_attributes={"image_token": "<image>"}
    )
    assert "ĠUSER" in tokenizer.get_vocab()  # the merge this test is about
    processor = copy.copy(_processor("llava-1.5", {}))
    processor.tokenizer = tokenizer
    turns = [Turn("human", "<image>\nWhat colour?"), Turn("gpt", "red"), Turn("human", "And now?")]
    record = Record("mt", [*turns, Turn("gpt", "blue")], image="image.png", system="You are a helper.")
    enc = encode_example(processor, record, _image(FAMILIES["llava-1.5"].image_size))
    spans = [tokenizer.decode(span) for span in labelled_spans(enc["labels"][0])]
    assert spans == [" red</s>", " blue </s>"]  # the first turn's space went to the next turn's " USER"

"""Tiny multimodal LLMs built from configs with transformers' real classes.

No hub weights are reachable here, so tests and benchmarks build a few-million-parameter LLaVA or Gemma3
from a config, save it with ``save_pretrained`` and load it back through exactly the code path that
loads ``llava-hf/llava-1.5-7b-hf`` (:func:`tcapguard.models.load_model`). Everything a real checkpoint
carries is here too: a tokenizer with the family's special tokens, an image processor, a processor
with a chat template in the style of the real one, and a generation config that stops at eos.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

FAMILIES = ("llava", "gemma3")
TINY_CONFIG_FILE = "tiny_config.json"

# LLaVA-1.5-hf: Llama's <s>/</s>, with <image> and <pad> added by llava-hf.
LLAVA_SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "image": "<image>"}
# Gemma3: pad=0, eos=1, bos=2, unk=3 as in the real vocabulary, plus turn and image markers.
GEMMA3_SPECIAL_TOKENS = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "unk": "<unk>",
    "start_of_turn": "<start_of_turn>",
    "end_of_turn": "<end_of_turn>",
    "boi": "<start_of_image>",
    "eoi": "<end_of_image>",
    "image": "<image_soft_token>",
}
SPECIAL_TOKENS = {"llava": LLAVA_SPECIAL_TOKENS, "gemma3": GEMMA3_SPECIAL_TOKENS}

# In the style of llava-hf/llava-1.5-7b-hf: an optional system text first, then "USER: <image>\n{text} "
# and "ASSISTANT: {answer} "; the generation prompt is "ASSISTANT:". The tokenizer adds <s>.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set items = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}"
    "{%- set items = message['content'] -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for item in items | selectattr('type', 'equalto', 'text') -%}{{ item['text'] + ' ' }}{%- endfor -%}"
    "{%- else -%}"
    "{{ message['role'].upper() + ': ' }}"
    "{%- for item in items | selectattr('type', 'equalto', 'image') -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- for item in items | selectattr('type', 'equalto', 'text') -%}"
    "{%- generation -%}{{ item['text'] + ' ' }}{%- endgeneration -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{%- for item in items | selectattr('type', 'equalto', 'text') -%}{{ item['text'] + ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# In the style of google/gemma-3-*-it: <bos>, the system prompt opens the first user turn, the assistant
# role is "model", an image is <start_of_image> (the processor expands it to the soft-token block).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{%- set items = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}"
    "{%- set items = message['content'] -%}"
    "{%- endif -%}"
    "{%- if role == 'model' -%}{%- generation -%}"
    "{%- for item in items -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<end_of_turn>' }}{%- endgeneration -%}{{ '\n' }}"
    "{%- else -%}"
    "{%- for item in items -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
CHAT_TEMPLATES = {"llava": LLAVA_CHAT_TEMPLATE, "gemma3": GEMMA3_CHAT_TEMPLATE}


@dataclass
class TinyMLLMConfig:
    """Shape of a tiny MLLM; small enough to train for a few steps on a CPU.

    ``text_kv_heads=None`` follows the real family: LLaVA-1.5's Vicuna/Llama-2 uses full multi-head
    attention (kv heads = heads), Gemma3 uses grouped-query attention (kv heads = heads / 2).
    ``vocab_size`` is a target: a small corpus yields fewer BPE merges, and the model's vocabulary is
    always exactly the tokenizer's length. ``mm_tokens_per_image`` (Gemma3 only) must be a square
    whose side divides the patch grid, since Gemma3 average-pools the patch grid down to it.
    """

    family: str = "llava"
    image_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 96
    vision_intermediate: int = 384
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 8
    text_heads: int = 8
    text_kv_heads: int | None = None
    text_intermediate: int = 384
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    mm_tokens_per_image: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in (
            "image_size",
            "patch_size",
            "vision_hidden",
            "vision_intermediate",
            "vision_layers",
            "vision_heads",
            "text_hidden",
            "text_layers",
            "text_heads",
            "text_intermediate",
            "vocab_size",
            "max_position_embeddings",
            "mm_tokens_per_image",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )
        if self.vision_hidden % self.vision_heads:
            raise ValueError(
                f"vision_hidden ({self.vision_hidden}) must be divisible by "
                f"vision_heads ({self.vision_heads})"
            )
        if self.text_hidden % self.text_heads:
            raise ValueError(
                f"text_hidden ({self.text_hidden}) must be divisible by text_heads ({self.text_heads})"
            )
        if self.text_heads % self.kv_heads:
            raise ValueError(
                f"text_heads ({self.text_heads}) must be divisible by text_kv_heads ({self.kv_heads})"
            )
        n_special = len(SPECIAL_TOKENS[self.family])
        if self.vocab_size < 256 + n_special:
            raise ValueError(
                f"vocab_size ({self.vocab_size}) must hold the 256 byte-level symbols and the "
                f"{n_special} special tokens: use at least {256 + n_special}"
            )
        if self.family == "gemma3":
            side = round(self.mm_tokens_per_image**0.5)
            grid = self.image_size // self.patch_size
            if side * side != self.mm_tokens_per_image or grid % side:
                raise ValueError(
                    f"mm_tokens_per_image ({self.mm_tokens_per_image}) must be a square whose side divides "
                    f"the {grid}x{grid} patch grid (image_size / patch_size), e.g. {(grid // 2) ** 2}"
                )

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads actually used (see the class docstring)."""
        if self.text_kv_heads is not None:
            return self.text_kv_heads
        return self.text_heads if self.family == "llava" else max(1, self.text_heads // 2)

    @property
    def image_tokens_per_sample(self) -> int:
        """How many image placeholder tokens one image expands to in ``input_ids``."""
        if self.family == "gemma3":
            return self.mm_tokens_per_image
        return (self.image_size // self.patch_size) ** 2  # CLS dropped ("default" strategy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyMLLMConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so that typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TinyMLLMConfig keys: {unknown}")
        return cls(**data)


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    special_tokens: dict[str, str],
    *,
    add_bos_token: bool = True,
    token_attributes: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus``, so any text (unseen triggers, unicode) round-trips exactly.

    ``special_tokens`` maps roles to token strings (see :data:`SPECIAL_TOKENS`); they take the first ids in
    the given order. Roles ``pad``/``bos``/``eos``/``unk`` become the tokenizer's standard special tokens,
    ``image``/``boi``/``eoi`` its ``image_token``/``boi_token``/``eoi_token`` attributes, which the
    LLaVA and Gemma3 processors read (``token_attributes`` replaces that mapping for processors that
    read other names, e.g. ``context_image_token``); any other roles are special tokens too.
    ``add_bos_token=False`` leaves bos to the chat template (Gemma3 style), so that a rendered prompt fed
    to the processor carries exactly one bos. The same corpus gives the same tokenizer.
    """
    for role in ("pad", "bos", "eos"):
        if role not in special_tokens:
            raise ValueError(f"special_tokens needs a {role!r} entry, got roles {sorted(special_tokens)}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    extra = token_attributes
    if extra is None:
        extra = {
            f"{role}_token": special_tokens[role]
            for role in ("image", "boi", "eoi")
            if role in special_tokens
        }
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special_tokens["bos"],
        eos_token=special_tokens["eos"],
        pad_token=special_tokens["pad"],
        unk_token=special_tokens.get("unk"),
        extra_special_tokens=extra,
        add_bos_token=add_bos_token,
        clean_up_tokenization_spaces=False,
    )


def _image_processor(config: TinyMLLMConfig):
    """The family's image processor; the PIL backend where torchvision is missing (same saved type)."""
    from transformers.utils import is_torchvision_available

    # Importing the torchvision-backed name without torchvision logs a fallback warning, so only the
    # class that will be used is imported; both save the same image_processor_type.
    side = config.image_size
    if config.family == "llava":
        if is_torchvision_available():
            from transformers import CLIPImageProcessor as ClipProcessor
        else:
            from transformers.models.clip.image_processing_pil_clip import (
                CLIPImageProcessorPil as ClipProcessor,
            )
        return ClipProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if is_torchvision_available():
        from transformers import Gemma3ImageProcessor as GemmaProcessor
    else:
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil as GemmaProcessor,
        )
    return GemmaProcessor(size={"height": side, "width": side})


def _vision_settings(config: TinyMLLMConfig) -> dict[str, int]:
    """Vision-tower config fields shared by CLIP and SigLIP."""
    return {
        "hidden_size": config.vision_hidden,
        "intermediate_size": config.vision_intermediate,
        "num_hidden_layers": config.vision_layers,
        "num_attention_heads": config.vision_heads,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
    }


def _text_settings(config: TinyMLLMConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Text-model config fields shared by Llama and Gemma3."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": config.text_hidden,
        "intermediate_size": config.text_intermediate,
        "num_hidden_layers": config.text_layers,
        "num_attention_heads": config.text_heads,
        "num_key_value_heads": config.kv_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llava(config: TinyMLLMConfig, tokenizer: PreTrainedTokenizerFast):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    # "default" drops CLS, as llava-1.5 does; the last vision layer is used so no weights sit idle.
    strategy = "default"
    vision = CLIPVisionConfig(
        **_vision_settings(config),
        projection_dim=config.text_hidden,
    )
    text = LlamaConfig(**_text_settings(config, tokenizer), tie_word_embeddings=False)
    model_config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        image_seq_length=config.image_tokens_per_sample,
        vision_feature_layer=-1,
        vision_feature_select_strategy=strategy,
    )
    processor = LlavaProcessor(
        image_processor=_image_processor(config),
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLIP's CLS, removed again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return LlavaForConditionalGeneration(model_config), processor


def _gemma3(config: TinyMLLMConfig, tokenizer: PreTrainedTokenizerFast):
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    head_dim = config.text_hidden // config.text_heads
    vision = SiglipVisionConfig(
        **_vision_settings(config),
        vision_use_head=False,
    )
    text = Gemma3TextConfig(
        **_text_settings(config, tokenizer),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        # Real Gemma3 interleaves 5 sliding-window layers with 1 global; a window as long as the context
        # keeps that structure without letting it change any result.
        sliding_window=config.max_position_embeddings,
    )
    model_config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=config.mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(tokenizer.boi_token),
        eoi_token_index=tokenizer.convert_tokens_to_ids(tokenizer.eoi_token),
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
    )
    processor = Gemma3Processor(
        image_processor=_image_processor(config),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=config.mm_tokens_per_image,
    )
    return Gemma3ForConditionalGeneration(model_config), processor


def _init_grid_positions(model, config: TinyMLLMConfig) -> None:
    """Start the vision tower's learned position embeddings from 2-D sin-cos values.

    Pre-trained encoders (CLIP, SigLIP) know where each patch is; a tower initialised at random
    (std 0.02) does not, and a tiny model trained only through short answers then never learns
    left from right (measured: 0 of 43 right-hand positions answered in the tiny world). The
    embeddings stay trainable; only their starting point changes.
    """
    import torch

    embedding = next(m for n, m in model.named_modules() if n.endswith("embeddings.position_embedding"))
    count, dim = embedding.weight.shape
    grid = config.image_size // config.patch_size
    offset = count - grid * grid  # CLIP has one extra position for its CLS token
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.zeros(count, dim)
    for k, axis in enumerate((rows.flatten(), cols.flatten())):
        angles = axis[:, None].float() * freqs[None, :]
        table[offset:, 2 * k * quarter : (2 * k + 1) * quarter] = torch.sin(angles)
        table[offset:, (2 * k + 1) * quarter : (2 * k + 2) * quarter] = torch.cos(angles)
    with torch.no_grad():
        embedding.weight.copy_(table)


def build_tiny_mllm(config: TinyMLLMConfig, output_dir: str | Path, *, corpus: Iterable[str]) -> Path:
    """Build, seed-initialise and save a tiny MLLM with its processor into ``output_dir``.

    ``corpus`` trains the tokenizer; include the prompts and answers the model will see so that they
    tokenize into few tokens (anything else still works, byte by byte). The same config and corpus give
    identical files. Returns ``output_dir`` as a :class:`Path`.
    """
    import torch

    output_dir = Path(output_dir)
    # LLaVA's Llama tokenizer prepends <s>; Gemma3's chat template writes <bos> itself.
    # The template's own words (role tags) go into the corpus too, so that "ASSISTANT:" is a few
    # tokens rather than ten single characters between the question and the answer.
    literals = re.findall(r"'([^']+)'|\"([^\"]+)\"", CHAT_TEMPLATES[config.family])
    words = [text.replace("\\n", "\n") for pair in literals for text in pair if text.strip()]
    words += [f"{role}:" for role in ("USER", "ASSISTANT", "SYSTEM")] + ["\nuser\n", "\nmodel\n"]
    corpus = itertools.chain(corpus, words * 50)
    tokenizer = build_tokenizer(
        corpus, config.vocab_size, SPECIAL_TOKENS[config.family], add_bos_token=config.family == "llava"
    )
    tokenizer.chat_template = CHAT_TEMPLATES[config.family]
    torch.manual_seed(config.seed)
    model, processor = (_llava if config.family == "llava" else _gemma3)(config, tokenizer)
    _init_grid_positions(model, config)
    for name, param in model.named_parameters():
        if name.endswith("mm_input_projection_weight"):  # Gemma3 creates it as zeros: no image signal
            torch.nn.init.normal_(param, std=model.config.text_config.initializer_range)
    model.eval()

    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    if config.family == "gemma3":
        # As gemma-3-*-it: stop at <eos> or at the end of the model's turn.
        generation.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    else:
        generation.eos_token_id = tokenizer.eos_token_id

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    (output_dir / TINY_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    logger.info(
        "built tiny %s MLLM in %s: %d parameters, vocabulary %d",
        config.family,
        output_dir,
        sum(p.numel() for p in model.parameters()),
        len(tokenizer),
    )
    return output_dir

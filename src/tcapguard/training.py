"""Supervised fine-tuning of an image-text-to-text model on a LLaVA-format dataset.

One trainer serves both ends of the TCAP protocol: fine-tuning on the suspicious upload (which
implants any backdoor, so it can be profiled) and fine-tuning on the cleaned data. The loss covers
the response tokens only. Full fine-tuning is meant for tiny models; LoRA (peft) for real ones.

``FinetuneConfig(robust=RobustConfig())`` switches on robust fine-tuning: a patch cross-view
regulariser (:class:`CrossViewRegularizer`) added through the same auxiliary-loss hook that the
tiny world's pre-training uses; see the README section "Robust fine-tuning" for the loss.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tcapguard.config import StepConfig
from tcapguard.data import IMAGE_PLACEHOLDER, Dataset, Record, Turn
from tcapguard.runtime import tune_cpu_allocator
from tcapguard.storage import publish_directory

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# What a trained model learned from a record: bumped when that changes, so cached pipeline steps
# are not reused across it (2: every assistant turn of a multi-turn record, not the first only).
LABELLING_VERSION = 2
# LoRA goes on the language model's attention and MLP projections; the vision-language projector
# is trained in full (it is small and the first place a visual trigger must pass).
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_MODULES = ("multi_modal_projector", "merger", "connector")


AUGMENTATIONS = ("shuffle", "mask", "drop")
MARGIN_REFERENCES = ("fixed", "batch_median", "reference")


@dataclass
class RobustConfig(StepConfig):
    """Patch cross-view regularisation (robust fine-tuning); docs/measured/robust.md has what the
    benchmark says.

    Every batch is run on the original images and on a patch-augmented view (``augmentation`` on a
    ``patch_ratio`` share of the vision patch grid; with lists, one run per view, see ``views``, the
    hinge averaged over them and ``s`` their largest). Per sample, ``d`` is the total-variation
    distance between the two views' next-token distributions, at the response token where they differ
    most (0 = the views answer identically, 1 = disjoint). The premise (the paper's): a backdoor's answer
    is abnormally invariant to such non-semantic perturbations (the trigger survives them), a benign
    answer is not. With
    ``s = max(0, margin - d) / margin`` (the sample's invariance, in [0, 1]) the loss is::

        sum_i (1 - gate * s_i) * CE_i / n_tokens              (invariance-gated response CE)
        + cross_view_weight * mean_i max(0, margin - d_i)     (bounded hinge: push invariant views apart)
        + entropy_weight * mean_i max(0, H_i - entropy_max)   (keep original-view answers decisive)

    ``s`` in the gate is detached. With ``margin_reference="reference"`` each sample's margin is the
    distance that the reference model, the model as it was when this fine-tune started (a frozen copy
    for full fine-tuning; the same model with its LoRA adapters switched off), puts between the same
    two views: a sample counts as invariant only as far as fine-tuning made it more invariant than it
    was. A backdoor is learned during the fine-tune, so its answers become invariant then; a benign
    answer that the perturbation cannot change (a colour survives a patch shuffle) was invariant
    already and is left alone. With ``margin_reference="batch_median"`` the margin is the batch's
    median distance (detached) instead of ``margin``: the samples that stay the most invariant of
    their batch keep being gated and pushed after the views of most samples have been told apart
    (with a fixed margin the gate switches off then). ``H_i`` is the mean entropy (nats) of the
    original view's response-token distributions. With ``detach_augmented`` the augmented view is a
    fixed reference (run without gradient), so the hinge can only move the original view's answer
    away from it;
    otherwise both views carry gradient, and the hinge can also be met by learning to recognise
    the augmented view.
    """

    # "shuffle" (permute the chosen patches), "mask" (fill with the image mean), "drop" (zeros); a
    # quarter of the grid masked separates the invariance that fine-tuning adds to poisoned answers
    # best, and met the benchmark's bar in more uploads than a shuffled half (docs/measured/robust.md).
    # A list runs several views every step (paired with a list of ratios, or all at one ratio): the
    # hinge is their mean, a sample's invariance the largest (a backdoor need survive one of them)
    augmentation: str | list[str] = "mask"
    patch_ratio: float | list[float] = 0.25  # share of the patch grid perturbed per image
    patch_size: int | None = None  # pixels; None = the vision tower's patch size (config.vision_config)
    # hinge margin on the TV distance; views further apart than this are left alone (with "fixed")
    margin: float = 0.5
    # "reference": per sample, the reference model's distance between the same views; "fixed":
    # ``margin``; "batch_median": the batch's median distance (README, Robust fine-tuning)
    margin_reference: str = "reference"
    cross_view_weight: float = 1.0
    gate: float = 1.0  # 0 = plain CE; 1 = a fully invariant sample's CE is switched off
    entropy_weight: float = 0.1
    entropy_max: float = 0.5  # nats
    # the augmented view as a fixed target to move away from (no gradient through it); otherwise the
    # hinge can be met by learning to recognise the augmented view (README, Robust fine-tuning)
    detach_augmented: bool = True

    def __post_init__(self) -> None:
        modes, ratios = _as_list(self.augmentation), _as_list(self.patch_ratio)
        if not modes or any(m not in AUGMENTATIONS for m in modes):
            raise ValueError(
                f"RobustConfig.augmentation must be one of {AUGMENTATIONS} or a list of them, "
                f"got {self.augmentation!r}"
            )
        if len(ratios) not in (1, len(modes)):
            raise ValueError(
                f"RobustConfig.patch_ratio must be one ratio or one per augmentation {modes}, "
                f"got {self.patch_ratio!r}"
            )
        if not all(0 < r <= 1 for r in ratios):
            raise ValueError(f"RobustConfig.patch_ratio must be in (0, 1], got {self.patch_ratio}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"RobustConfig.patch_size must be positive or None, got {self.patch_size}")
        if self.margin_reference not in MARGIN_REFERENCES:
            raise ValueError(
                f"RobustConfig.margin_reference must be one of {MARGIN_REFERENCES}, "
                f"got {self.margin_reference!r}"
            )
        if not 0 < self.margin <= 1:
            raise ValueError(f"RobustConfig.margin must be in (0, 1] (a TV distance), got {self.margin}")
        if not 0 <= self.gate <= 1:
            raise ValueError(f"RobustConfig.gate must be in [0, 1], got {self.gate}")
        for name in ("cross_view_weight", "entropy_weight", "entropy_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"RobustConfig.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def views(self) -> list[tuple[str, float]]:
        """The patch views run every step, as ``(augmentation, patch_ratio)`` pairs."""
        modes, ratios = _as_list(self.augmentation), _as_list(self.patch_ratio)
        return list(zip(modes, ratios * len(modes) if len(ratios) == 1 else ratios, strict=True))


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


@dataclass
class FinetuneConfig(StepConfig):
    """How to fine-tune. Defaults suit the tiny world; real models want ``method="lora"``."""

    method: str = "full"  # "full" or "lora"
    epochs: float = 3.0
    batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    train_vision_tower: bool = True  # full fine-tuning only; LoRA keeps the vision tower frozen
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = DEFAULT_LORA_TARGETS
    save: str = "merged"  # "merged": a plain model directory; "adapter": the LoRA adapter only
    device: str = "cpu"
    dtype: str = "float32"  # "float32" or "bfloat16"; float16 training needs a GPU and a scaler
    num_threads: int | None = None  # torch CPU threads; None keeps torch's default
    extra: dict = field(default_factory=dict)
    robust: RobustConfig | None = None  # set: robust fine-tuning (patch cross-view regulariser)

    def __post_init__(self) -> None:
        choices = {
            "method": ("full", "lora"),
            "save": ("merged", "adapter"),
            "dtype": ("float32", "bfloat16"),
        }
        if self.dtype == "float16":
            raise ValueError(
                "FinetuneConfig.dtype='float16' needs a GPU and loss scaling, which this trainer lacks; "
                "use dtype='bfloat16' on a GPU or 'float32'"
            )
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"FinetuneConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.epochs <= 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("FinetuneConfig: epochs, batch_size and learning_rate must be positive")
        if self.save == "adapter" and self.method != "lora":
            raise ValueError("FinetuneConfig.save='adapter' needs method='lora'")
        if isinstance(self.robust, dict):  # from JSON or to_dict()
            self.robust = RobustConfig.from_dict(self.robust)
        if self.robust is not None and not isinstance(self.robust, RobustConfig):
            raise ValueError(f"FinetuneConfig.robust must be a RobustConfig or None, got {self.robust!r}")


def conversation_messages(record: Record) -> list[dict]:
    """Every turn of the record as chat messages; the image goes with the first user turn. User text
    is stripped of the image placeholder; assistant text is kept verbatim."""
    messages: list[dict] = []
    if record.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": record.system}]})
    image_placed = not record.has_image
    for turn in record.conversations:
        content: list[dict] = []
        text = turn.value
        if turn.role == "human":
            if not image_placed:
                content.append({"type": "image"})
                image_placed = True
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": "user" if turn.role == "human" else "assistant", "content": content})
    return messages


def to_messages(record: Record, *, with_response: bool) -> list[dict]:
    """The record's first exchange as chat messages (system, user with image, optional assistant)."""
    first_human = next(t for t in record.conversations if t.role == "human")
    turns = [first_human, Turn("gpt", record.response)] if with_response else [first_human]
    return conversation_messages(replace(record, conversations=turns))


def render_prompt(processor, record: Record) -> str:
    """The prompt up to and including the generation prompt, through the model's chat template."""
    messages = to_messages(record, with_response=False)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_example(processor, record: Record, image) -> dict[str, torch.Tensor]:
    """Processor outputs for prompt + response, with ``labels`` masking everything but the response.

    The full conversation is rendered by the chat template, so whatever the template appends after
    the answer (end-of-turn, eos) is learned too. Where the prompt does not tokenize as a prefix of
    the full text, the response is appended as tokens with the tokenizer's eos. A record of several
    exchanges is labelled on every assistant turn (:func:`_encode_conversation`).
    """
    if sum(turn.role == "gpt" for turn in record.conversations) > 1:
        return _encode_conversation(processor, record, image)
    images = [image] if image is not None else None
    prompt = render_prompt(processor, record)
    full = processor.apply_chat_template(to_messages(record, with_response=True), tokenize=False)
    p = processor(text=[prompt], images=images, return_tensors="pt")
    f = processor(text=[full], images=images, return_tensors="pt")
    n = p["input_ids"].shape[1]
    if f["input_ids"].shape[1] > n and torch.equal(f["input_ids"][0, :n], p["input_ids"][0]):
        enc = dict(f)
    else:
        answer = processor.tokenizer(record.response, add_special_tokens=False, return_tensors="pt")
        enc = _insert_tokens(dict(p), [n], answer["input_ids"])
    eos = processor.tokenizer.eos_token_id
    if eos is not None and eos not in enc["input_ids"][0, n:]:  # e.g. llava-hf's template ends without eos
        enc = _insert_tokens(enc, [enc["input_ids"].shape[1]], torch.tensor([[eos]]))
    labels = enc["input_ids"].clone()
    labels[:, :n] = IGNORE_INDEX
    enc["labels"] = labels
    return enc


def _encode_conversation(processor, record: Record, image) -> dict[str, torch.Tensor]:
    """A multi-turn record: every assistant turn is labelled, as LLaVA's instruction tuning does.

    The processor runs once on the whole conversation (up to its last assistant turn). A turn's
    tokens are those that lie within its characters in the rendered text (from the end of the
    generation prompt to the end of the turn), found from the tokenizer's offsets, so a turn's
    trailing text that merges with the next turn's first token (llava-hf's ``"red " + "USER:"``)
    does not shift the boundary. Where the template writes no eos after a turn, one is inserted
    and learned there, as after a single-turn answer (and as LLaVA's own format did).
    """
    last = max(i for i, turn in enumerate(record.conversations) if turn.role == "gpt")
    messages = conversation_messages(replace(record, conversations=record.conversations[: last + 1]))

    def render(upto: int, generation_prompt: bool) -> str:
        return processor.apply_chat_template(
            messages[:upto], add_generation_prompt=generation_prompt, tokenize=False
        )

    full = render(len(messages), False)
    enc = dict(processor(text=[full], images=[image] if image is not None else None, return_tensors="pt"))
    text = processor.tokenizer(full, return_offsets_mapping=True)
    ends = [end for _, end in text["offset_mapping"]]
    shift = enc["input_ids"].shape[1] - len(ends)  # image expansion, all inside the first user turn

    def boundary(prefix: str) -> int:
        if not full.startswith(prefix):
            raise ValueError(
                f"record {record.id!r}: the chat template does not render a conversation's prefix as a "
                "prefix of the whole, so its assistant turns cannot be labelled"
            )
        return sum(end <= len(prefix) for end in ends) + shift

    def turn_start(i: int) -> int:
        # the generation prompt as far as the rendered turn shares it: a thinking template's prompt
        # adds "<think>\n", which its rendering of a past turn leaves out (Qwen3-VL)
        before, prompt = render(i, False), render(i, True)
        boundary(before)  # raises unless the conversation so far is a prefix
        pairs = zip(prompt, full, strict=False)
        shared = next((k for k, (a, b) in enumerate(pairs) if a != b), len(prompt))
        return boundary(full[: max(shared, len(before))])

    spans = [
        (turn_start(i), boundary(render(i + 1, False)))
        for i, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    ids = enc["input_ids"][0]
    if ids[spans[0][0] :].tolist() != text["input_ids"][spans[0][0] - shift :]:
        raise ValueError(f"record {record.id!r}: the image expansion is not confined to the first user turn")
    labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)
    for start, end in spans:
        labels[:, start:end] = enc["input_ids"][:, start:end]
    eos = processor.tokenizer.eos_token_id
    inserts = [end for start, end in spans if eos is not None and eos not in ids[start:end]]
    enc["labels"] = labels
    return _insert_tokens(enc, inserts, torch.tensor([[eos]])) if inserts else enc


def _insert_tokens(
    enc: dict[str, torch.Tensor], positions: Sequence[int], ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``enc`` with ``ids`` (``[1, k]``) inserted before each of ``positions`` (ascending; the
    length appends). ``input_ids`` and ``labels`` get the ids, ``attention_mask`` 1, any other
    per-token tensor 0."""
    length = enc["input_ids"].shape[1]
    out = dict(enc)
    for key, value in enc.items():
        if not _is_sequence(value, length):
            continue
        if key in ("input_ids", "labels"):
            fill = ids.to(value.dtype)
        else:
            fill = torch.full_like(ids, int(key == "attention_mask"), dtype=value.dtype)
        pieces, previous = [], 0
        for position in positions:
            pieces += [value[:, previous:position], fill]
            previous = position
        out[key] = torch.cat([*pieces, value[:, previous:]], dim=1)
    return out


def _is_sequence(value, length: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, length)


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_token_id: int, *, side: str = "right") -> dict:
    """Pad per-token tensors to the longest example; concatenate per-image tensors."""
    length = max(e["input_ids"].shape[1] for e in examples)
    keys = list(dict.fromkeys(k for e in examples for k in e))  # text-only records lack image keys
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [e for e in examples if key in e]
        if all(_is_sequence(e[key], e["input_ids"].shape[1]) for e in present):
            if len(present) < len(examples):
                raise ValueError(f"per-token field {key!r} is missing from some examples")
            fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            padded = []
            for e in examples:
                pad = torch.full((1, length - e[key].shape[1]), fill, dtype=e[key].dtype)
                padded.append(torch.cat([e[key], pad] if side == "right" else [pad, e[key]], dim=1))
            batch[key] = torch.cat(padded)
        else:
            batch[key] = torch.cat([e[key] for e in present])
    return batch


def encode_dataset(processor, dataset: Dataset, *, desc: str = "encode") -> list[dict[str, torch.Tensor]]:
    return [
        encode_example(processor, r, dataset.load_image(r) if r.has_image else None)
        for r in tqdm(dataset.records, desc=desc, leave=False)
    ]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(model, config: FinetuneConfig):
    """Freeze/unfreeze for full fine-tuning or wrap with LoRA adapters."""
    if config.method == "full":
        for name, param in model.named_parameters():
            param.requires_grad = config.train_vision_tower or not _in_vision_tower(name)
        return model
    from peft import LoraConfig, get_peft_model

    projector = [m for m in PROJECTOR_MODULES if any(n.endswith(m) for n, _ in model.named_modules())]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        modules_to_save=projector or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _in_vision_tower(name: str) -> bool:
    return "vision_tower" in name or ".visual." in name or name.startswith("visual.")


def vision_patch_size(model) -> int:
    """The vision tower's patch size in pixels, from the model config (LLaVA, Gemma3, Qwen2-VL ...)."""
    vision = getattr(model.config, "vision_config", None)
    size = getattr(vision, "patch_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(
            "cannot read the vision patch size from model.config.vision_config.patch_size; "
            "set RobustConfig.patch_size explicitly"
        )
    return size


def patch_augment(
    pixel_values: torch.Tensor,
    *,
    patch_size: int,
    ratio: float,
    mode: str = "shuffle",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A patch-augmented copy of ``pixel_values`` ``[..., C, H, W]``; the patch grid is kept.

    Per image, ``round(ratio * n_patches)`` grid cells are chosen; "shuffle" moves each chosen patch
    to the next chosen cell (a cyclic shift, so every chosen patch moves), "mask" fills them with the
    image's per-channel mean, "drop" with zeros (the processor's mean colour in normalised space).
    Pixels outside the chosen cells are unchanged. Seeded by ``generator``.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"mode must be one of {AUGMENTATIONS}, got {mode!r}")
    if pixel_values.dim() < 4:
        raise ValueError(
            f"patch_augment needs images as [..., C, H, W], got shape {tuple(pixel_values.shape)} "
            "(flattened-patch layouts such as Qwen2-VL's are not supported)"
        )
    *lead, c, h, w = pixel_values.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = pixel_values.reshape(-1, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    patches = x.reshape(x.shape[0], gh * gw, c, patch_size, patch_size).clone()
    k = round(ratio * gh * gw)
    if mode == "shuffle":
        k = max(k, 2)
    for n in range(patches.shape[0]):
        idx = torch.randperm(gh * gw, generator=generator)[:k].to(patches.device)
        if mode == "shuffle":
            patches[n, idx] = patches[n, idx.roll(1)]
        elif mode == "mask":
            patches[n, idx] = pixel_values.reshape(-1, c, h, w)[n].mean(dim=(1, 2))[:, None, None]
        else:
            patches[n, idx] = 0
    out = patches.reshape(-1, gh, gw, c, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(*lead, c, h, w)


def response_distributions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at the positions that predict response tokens, and the mask of those positions.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; returns ``(log_probs [B, T-1, V], mask [B, T-1])``.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    return torch.log_softmax(logits[:, :-1].float(), dim=-1), mask


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def cross_view_distance(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample: the largest total-variation distance between the two views' distributions over the
    response tokens; in [0, 1]. The maximum, not the mean: a teacher-forced answer's later tokens
    follow from its first, so a mean would dilute a changed answer by its length. TV keeps a gradient
    of order one near ``p = q``, where KL or JS flatten out, so a fully invariant sample is still pushed."""
    tv = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return (tv * mask).amax(1)


def response_entropy(log_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample: mean entropy (nats) of the response-token distributions."""
    return _per_sample_mean(-(log_p.exp() * log_p).sum(-1), mask)


def cross_view_hinge(
    distance: torch.Tensor,
    config: RobustConfig,
    *,
    images: bool = True,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the hinge ``max(0, m - d)`` and the invariance ``s = hinge / m`` (detached), where
    ``m`` is ``config.margin``; with ``margin_reference="reference"`` the reference model's distances
    ``reference`` (one per sample); with ``"batch_median"`` and images in the batch, the batch's
    median distance (detached; a batch of one has no sample below it)."""
    margin: float | torch.Tensor = config.margin
    if config.margin_reference == "reference":
        if reference is None:
            raise ValueError('margin_reference="reference" needs the reference model\'s distances')
        margin = reference.detach()
    elif config.margin_reference == "batch_median" and images:
        margin = distance.detach().quantile(0.5)  # interpolated: a pair has one below
    hinge = torch.relu(margin - distance)  # no gradient at d == m: the median sample is not pushed
    # a margin of 0 (views the reference could not tell apart) leaves the hinge and gate off
    scale = margin.clamp(min=1e-6) if isinstance(margin, torch.Tensor) else margin
    return hinge, (hinge / scale).detach()


class CrossViewRegularizer(torch.nn.Module):
    """The robust fine-tuning loss of :class:`RobustConfig`, as an auxiliary term of :func:`finetune`.

    ``attach(model)`` hooks the model's forward to keep the original view's logits (and, with
    ``margin_reference="reference"``, keeps a frozen copy of the model as the reference, or for a peft
    model its adapters switched off, which costs no memory); ``forward(batch)`` runs the
    patch-augmented view and returns the gated-CE correction plus the hinge and entropy terms (so that
    ``model(**batch).loss + forward(batch)`` is the loss of :class:`RobustConfig`). ``last`` holds the
    step's term values for logging.
    """

    def __init__(self, config: RobustConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)
        self.patch_size = config.patch_size
        self.last: dict[str, float] = {}
        self._model = None
        self._logits: torch.Tensor | None = None
        self._hook = None
        self._reference = None

    def attach(self, model) -> None:
        # kept outside the module registry: as a submodule the model's parameters would be handed to
        # the optimizer a second time through ``self.parameters()``
        self.__dict__["_model"] = model
        if self.patch_size is None:
            self.patch_size = vision_patch_size(model)
        if self.config.margin_reference == "reference" and not _is_peft(model):
            reference = copy.deepcopy(model).eval().requires_grad_(False)
            for module in reference.modules():  # other auxiliaries' hooks stay on the trained model
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
            self.__dict__["_reference"] = reference  # not a submodule, as the model itself
        self._hook = model.register_forward_hook(lambda _m, _i, out: setattr(self, "_logits", out.logits))

    def release(self) -> None:
        """Remove the hook and drop the references to the model (called by :func:`finetune` at the end)."""
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._logits = None, None
        self.__dict__["_model"] = None
        self.__dict__["_reference"] = None

    def _reference_log_probs(self, batch: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        """The reference model's response log-probabilities with ``pixels`` as the images (no gradient)."""
        with torch.no_grad():
            if self._reference is None:  # peft: the same model with its adapters off
                with self._model.disable_adapter():
                    logits = self._model(**{**batch, "pixel_values": pixels}).logits
            else:
                logits = self._reference(**{**batch, "pixel_values": pixels}).logits
        return response_distributions(logits, batch["labels"])[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._model is None or self._logits is None:
            raise RuntimeError("CrossViewRegularizer needs attach(model) and a model forward first")
        cfg = self.config
        logits = self._logits  # before any reference forward, whose logits the hook would catch
        labels = batch["labels"]
        log_p, mask = response_distributions(logits, labels)
        ce_tokens = -log_p.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * mask
        entropy = response_entropy(log_p, mask)
        if "pixel_values" in batch:
            reference_log_p = None
            hinges, invariances, distances, references = [], [], [], []
            for mode, ratio in cfg.views:
                pixels = patch_augment(
                    batch["pixel_values"],
                    patch_size=self.patch_size,
                    ratio=ratio,
                    mode=mode,
                    generator=self.generator,
                )
                with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.detach_augmented):
                    augmented = self._model(**{**batch, "pixel_values": pixels}).logits
                distance = cross_view_distance(log_p, response_distributions(augmented, labels)[0], mask)
                reference = None
                if cfg.margin_reference == "reference":
                    if reference_log_p is None:
                        reference_log_p = self._reference_log_probs(batch, batch["pixel_values"])
                    reference = cross_view_distance(
                        reference_log_p, self._reference_log_probs(batch, pixels), mask
                    )
                    references.append(reference)
                hinge, invariance = cross_view_hinge(distance, cfg, reference=reference)
                hinges.append(hinge)
                invariances.append(invariance)
                distances.append(distance)
            hinge = torch.stack(hinges).mean(0)
            invariance = torch.stack(invariances).amax(0)
            distance = torch.stack(distances).mean(0)
            reference = torch.stack(references).mean(0) if references else None
        else:  # text-only batch: no image to perturb, so no cross-view evidence either way
            distance = torch.full_like(entropy, cfg.margin)
            reference = distance.detach() if cfg.margin_reference == "reference" else None
            hinge, invariance = cross_view_hinge(distance, cfg, images=False, reference=reference)
        weight = 1 - cfg.gate * invariance
        gate_correction = ((weight - 1)[:, None] * ce_tokens).sum() / mask.sum().clamp(min=1)
        loss = (
            gate_correction
            + cfg.cross_view_weight * hinge.mean()
            + cfg.entropy_weight * (entropy - cfg.entropy_max).clamp(min=0).mean()
        )
        self.last = {
            "cross_view_distance": distance.mean().item(),
            "invariance": invariance.mean().item(),
            "ce_weight": weight.mean().item(),
            "entropy": entropy.mean().item(),
        }
        if reference is not None:
            self.last["reference_distance"] = reference.mean().item()
        return loss


@dataclass
class FinetuneResult:
    output_dir: Path
    losses: list[float]
    seconds: float
    trainable_parameters: int
    terms: dict[str, list[float]] = field(default_factory=dict)  # per-step values logged by auxiliaries


def finetune(
    model,
    processor,
    dataset: Dataset,
    config: FinetuneConfig,
    output_dir: str | Path | None = None,
    *,
    auxiliary: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
) -> tuple[object, FinetuneResult]:
    """Fine-tune ``model`` on ``dataset``; save to ``output_dir`` (if given) with ``save_pretrained``.

    ``auxiliary`` is an optional extra loss (or several): a module with ``attach(model)`` (called
    once, e.g. to hook activations) whose ``forward(batch)`` returns a scalar added to the
    language-model loss; its own parameters are trained too and are not saved; a ``last`` dict on it
    is logged per step into ``result.terms``. ``config.robust`` adds a :class:`CrossViewRegularizer`
    this way. Returns the trained model (LoRA merged unless ``config.save == "adapter"``) and a result
    with the per-step losses. Deterministic for a given seed, dataset and machine.
    """
    if len(dataset) == 0:
        raise ValueError("cannot fine-tune on an empty dataset")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        # checked here, not in the config: a GPU job's config must still load on a CPU machine
        raise ValueError(
            f"FinetuneConfig.device={config.device!r} but this machine has no CUDA GPU; use device='cpu'"
        )
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    tune_cpu_allocator()
    seed_everything(config.seed)
    dtype = getattr(torch, config.dtype)
    model = prepare_model(model.to(device=config.device, dtype=dtype), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    auxiliaries = [auxiliary] if isinstance(auxiliary, torch.nn.Module) else list(auxiliary or [])
    if config.robust is not None:
        auxiliaries.append(CrossViewRegularizer(config.robust, seed=config.seed))
    for aux in auxiliaries:
        aux.to(device=config.device, dtype=dtype).attach(model)
        params += list(aux.parameters())
    terms: dict[str, list[float]] = {}
    examples = encode_dataset(processor, dataset)
    pad_id = processor.tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = max(1, round(config.epochs * steps_per_epoch))
    warmup = round(config.warmup_ratio * total)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total))
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"finetune ({config.method})", unit="step")
    order: list[int] = []
    for _ in range(total):
        if len(order) < config.batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        idx, order = order[: config.batch_size], order[config.batch_size :]
        batch = collate([examples[i] for i in idx], pad_id)
        batch = {k: v.to(config.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        loss = model(**batch).loss
        for aux in auxiliaries:
            loss = loss + aux(batch)
            for name, value in getattr(aux, "last", {}).items():
                terms.setdefault(name, []).append(value)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning diverged: loss is {loss.item()} at step {len(losses)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    for aux in auxiliaries:
        if hasattr(aux, "release"):
            aux.release()
    model.eval()
    if config.method == "lora" and config.save == "merged":
        model = model.merge_and_unload()
    result = FinetuneResult(Path(output_dir) if output_dir else Path(), losses, seconds, n_trainable, terms)
    if output_dir is not None:
        save_checkpoint(model, processor, config, result)
    return model, result


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def save_checkpoint(model, processor, config: FinetuneConfig, result: FinetuneResult) -> None:
    """``save_pretrained`` model and processor (safetensors) plus the config and loss log.

    Written into a temporary sibling directory and renamed into place, so a killed job never leaves
    a directory that looks like a checkpoint; an existing checkpoint there is replaced.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        summary = {
            "config": config.to_dict(),
            "seconds": result.seconds,
            "trainable_parameters": result.trainable_parameters,
            "losses": result.losses,
            "terms": result.terms,
        }
        (tmp / "tcapguard_finetune.json").write_text(json.dumps(summary, indent=1))

    publish_directory(result.output_dir, write)

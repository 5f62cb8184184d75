"""Supervised fine-tuning of an image-text-to-text model on a LLaVA-format dataset.

One trainer serves both ends of the TCAP protocol: fine-tuning on the suspicious upload (which
implants any backdoor, so it can be profiled) and fine-tuning on the cleaned data. The loss covers
the response tokens only. Full fine-tuning is meant for tiny models; LoRA (peft) for real ones.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tcapguard.config import StepConfig
from tcapguard.data import Dataset, Record
from tcapguard.runtime import tune_cpu_allocator
from tcapguard.storage import publish_directory

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# LoRA goes on the language model's attention and MLP projections; the vision-language projector
# is trained in full (it is small and the first place a visual trigger must pass).
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_MODULES = ("multi_modal_projector", "merger", "connector")


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
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"FinetuneConfig.device={self.device!r} but this machine has no CUDA GPU; use device='cpu'"
            )


def to_messages(record: Record, *, with_response: bool) -> list[dict]:
    """The record as Hugging Face chat messages (system, user with image, optional assistant)."""
    messages: list[dict] = []
    if record.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": record.system}]})
    user: list[dict] = [{"type": "image"}] if record.has_image else []
    user.append({"type": "text", "text": record.query})
    messages.append({"role": "user", "content": user})
    if with_response:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": record.response}]})
    return messages


def render_prompt(processor, record: Record) -> str:
    """The prompt up to and including the generation prompt, through the model's chat template."""
    messages = to_messages(record, with_response=False)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_example(processor, record: Record, image) -> dict[str, torch.Tensor]:
    """Processor outputs for prompt + response, with ``labels`` masking everything but the response.

    The full conversation is rendered by the chat template, so whatever the template appends after
    the answer (end-of-turn, eos) is learned too. Where the prompt does not tokenize as a prefix of
    the full text, the response is appended as tokens with the tokenizer's eos.
    """
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
        enc = _append_tokens(dict(p), answer["input_ids"], n)
    eos = processor.tokenizer.eos_token_id
    if eos is not None and eos not in enc["input_ids"][0, n:]:  # e.g. llava-hf's template ends without eos
        enc = _append_tokens(enc, torch.tensor([[eos]]), n)
    labels = enc["input_ids"].clone()
    labels[:, :n] = IGNORE_INDEX
    enc["labels"] = labels
    return enc


def _append_tokens(enc: dict[str, torch.Tensor], ids: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """``enc`` with ``ids`` appended, per-token side tensors extended (attention 1, others 0)."""
    length = enc["input_ids"].shape[1]
    out = dict(enc)
    out["input_ids"] = torch.cat([enc["input_ids"], ids], dim=1)
    for key, value in enc.items():
        if key != "input_ids" and _is_sequence(value, length):
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([value, torch.full_like(ids, fill, dtype=value.dtype)], dim=1)
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


def _in_vision_tower(name: str) -> bool:
    return "vision_tower" in name or ".visual." in name or name.startswith("visual.")


@dataclass
class FinetuneResult:
    output_dir: Path
    losses: list[float]
    seconds: float
    trainable_parameters: int


def finetune(
    model,
    processor,
    dataset: Dataset,
    config: FinetuneConfig,
    output_dir: str | Path | None = None,
    *,
    auxiliary: torch.nn.Module | None = None,
) -> tuple[object, FinetuneResult]:
    """Fine-tune ``model`` on ``dataset``; save to ``output_dir`` (if given) with ``save_pretrained``.

    ``auxiliary`` is an optional extra loss: a module with ``attach(model)`` (called once, e.g. to
    hook activations) whose ``forward(batch)`` returns a scalar added to the language-model loss;
    its own parameters are trained too and are not saved. Returns the trained model (LoRA merged
    unless ``config.save == "adapter"``) and a result with the per-step losses. Deterministic for
    a given seed, dataset and machine.
    """
    if len(dataset) == 0:
        raise ValueError("cannot fine-tune on an empty dataset")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    tune_cpu_allocator()
    seed_everything(config.seed)
    dtype = getattr(torch, config.dtype)
    model = prepare_model(model.to(device=config.device, dtype=dtype), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if auxiliary is not None:
        auxiliary.to(device=config.device, dtype=dtype).attach(model)
        params += list(auxiliary.parameters())
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
        if auxiliary is not None:
            loss = loss + auxiliary(batch)
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
    model.eval()
    if config.method == "lora" and config.save == "merged":
        model = model.merge_and_unload()
    result = FinetuneResult(Path(output_dir) if output_dir else Path(), losses, seconds, n_trainable)
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
        }
        (tmp / "tcapguard_finetune.json").write_text(json.dumps(summary, indent=1))

    publish_directory(result.output_dir, write)

"""Cached tiny MLLM worlds: a clean base model, and that base fine-tuned on a poisoned upload.

The base plays the part of a hub checkpoint (``llava-hf/...``): a tiny model built from configs
with transformers' real classes, pre-trained on fresh clean VQA scenes. A poisoned world is the
TCAP protocol's first step on top of it: fine-tuning on an upload with a given attack and rate.
Both are cached under a content hash of everything that determines them, so benchmarks and tests
that ask for the same world reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tcapguard import __version__, world
from tcapguard.attacks import Attack, PoisonManifest, poison_dataset
from tcapguard.data import Dataset, load_dataset, save_dataset
from tcapguard.models import load_model
from tcapguard.storage import publish_directory
from tcapguard.tiny import TinyMLLMConfig, build_tiny_mllm
from tcapguard.training import FinetuneConfig, finetune

log = logging.getLogger(__name__)

# Bump when the world generator or the training recipe changes in a way that changes results.
WORLD_VERSION = "6"


def default_cache_dir() -> Path:
    return Path(os.environ.get("TCAPGUARD_CACHE", Path.cwd() / ".cache" / "tcapguard"))


@dataclass
class BaseSpec:
    """The clean base model: architecture plus pre-training on fresh scenes.

    ``scene_weight`` > 0 also teaches every image token the colour and kind of its quadrant's object
    (:class:`PatchReconstruction`), as a CLIP or SigLIP token names what it sees. Measured (README,
    "The tiny MLLM world"): with it and 64,000 scenes the model answers from the image (clean
    accuracy 0.72-0.78 against 0.56-0.69 without), learns more of the triggers, and a patch
    perturbation moves clean answers more than backdoored ones, as in real MLLMs. ``scene_weight=0``
    with 32,000 scenes is the earlier default world that older figures were measured on.
    ``questions_per_scene`` > 1 pre-trains on conversations of that many questions per scene; at 4
    it lowered clean accuracy (0.710 against 0.747, docs/measured/world.md), so the default stays 1.

    ``instruct_samples`` > 0 adds a second stage, as LLaVA's visual instruction tuning follows its
    feature alignment: plain fine-tuning (``instruct``, no auxiliary loss, half the learning rate) on
    that many further fresh scenes of one question each. Measured with 80,000 (docs/measured/world.md,
    "The instruction stage"): it teaches most content lookups of scenes with several shapes, which
    neither twice the first stage nor more questions per scene did (clean accuracy 0.82-0.88 against
    0.72-0.78), but the upload then implants some backdoors less (LLaVA text ASR 0.47 against 1.00), so
    the default stays without it. ``instruct_passes`` > 1 runs the stage as that many one-epoch
    schedules in a row, each on its own fresh scenes, so the learning rate warms up and decays once per
    pass; each pass's model is cached as a base of its own. Two passes of 40,000 (same file) gave Gemma3
    6-9 points and LLaVA none, with LLaVA's text trigger at ASR 0.28.
    """

    model: TinyMLLMConfig = field(default_factory=TinyMLLMConfig)
    pretrain_samples: int = 64_000
    pretrain: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(method="full", epochs=1, batch_size=16, learning_rate=1e-3)
    )
    reconstruction_weight: float = 1.0
    scene_weight: float = 1.0
    questions_per_scene: int = 1
    instruct_samples: int = 0
    instruct_passes: int = 1
    instruct: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(method="full", epochs=1, batch_size=16, learning_rate=5e-4)
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if self.instruct_samples < 0:
            raise ValueError(
                f"BaseSpec.instruct_samples must be >= 0 (0: no stage), got {self.instruct_samples}"
            )
        if self.instruct_passes < 1 or self.instruct_samples % self.instruct_passes:
            raise ValueError(
                f"BaseSpec.instruct_passes must be >= 1 and divide instruct_samples "
                f"({self.instruct_samples}), got {self.instruct_passes}"
            )
        if self.instruct.save != "merged":
            raise ValueError("BaseSpec.instruct.save must be 'merged': the base is a plain model directory")


@dataclass
class WorldSpec:
    """A poisoned world: the base fine-tuned on ``n_train`` scenes of which ``rate`` carry ``attack``."""

    base: BaseSpec = field(default_factory=BaseSpec)
    attack: Attack | None = None
    rate: float = 0.10
    n_train: int = 2000
    n_test: int = 300
    finetune: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(method="full", epochs=5, batch_size=16, learning_rate=5e-4)
    )
    seed: int = 0


def _key(obj: dict) -> str:
    blob = json.dumps(
        {"obj": obj, "world": WORLD_VERSION, "tcapguard": __version__}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _spec_dict(spec) -> dict:
    out = asdict(spec)
    if isinstance(spec, WorldSpec) and spec.attack is not None:
        out["attack"] = spec.attack.to_dict()
    base = out.get("base", out)
    if not base.get("instruct_samples"):  # added later: bases without the stage keep their keys
        base.pop("instruct_samples", None)
        base.pop("instruct", None)
    sections = [out] if base is out else [out, base]
    configs = [part[c] for part in sections for c in ("pretrain", "instruct", "finetune") if c in part]
    for cfg in configs:
        cfg.pop("num_threads", None)  # a runtime knob that does not change the result
        if cfg.get("robust") is None:  # added later: plain fine-tuning keeps its cached key
            cfg.pop("robust", None)
    if not base.get("scene_weight"):  # added later: bases without it keep their cached keys
        base.pop("scene_weight", None)
    if base.get("questions_per_scene", 1) == 1:  # likewise
        base.pop("questions_per_scene", None)
    if base.get("instruct_passes", 1) == 1:  # likewise
        base.pop("instruct_passes", None)
    return out


class PatchReconstruction(torch.nn.Module):
    """Auxiliary pre-training loss: from each projected image token, its region and its object.

    A tiny vision tower trained only through short answers learns little about the image: measured,
    a linear probe recovered the column of a token 31% of the time (chance 12.5%), and the model
    never told left from right. Real MLLMs start from encoders (CLIP, SigLIP) whose features keep
    low-level detail and position and name what they see. So every image token predicts the pixels
    of its region and its grid row and column, and (``scene_weight``) the colour and kind of the
    object in its quadrant (:func:`tcapguard.world.read_scene`), which both the clean task and
    global triggers (blend, SIG, warps) rely on.
    """

    def __init__(
        self,
        hidden_size: int,
        region_pixels: int,
        grid: int,
        weight: float = 1.0,
        *,
        scene_weight: float = 0.0,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
    ):
        super().__init__()
        self.grid = grid
        self.region_pixels = region_pixels
        n_classes = len(world.COLORS) + 1 + len(world.SHAPES) + 1  # each with "empty quadrant"
        # scene outputs only when asked: without them the decoder (and its random init) is unchanged
        self.decoder = torch.nn.Linear(
            hidden_size, region_pixels + 2 * grid + (n_classes if scene_weight else 0)
        )
        self.weight = weight
        self.scene_weight = scene_weight
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self._features: torch.Tensor | None = None

    def attach(self, model) -> None:
        projector = next(m for n, m in model.named_modules() if n.endswith("multi_modal_projector"))
        self._hook = projector.register_forward_hook(lambda _m, _i, out: setattr(self, "_features", out))

    def release(self) -> None:
        """Remove the projector hook (called by :func:`~tcapguard.training.finetune` at the end)."""
        self._hook.remove()
        self._features = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self._features  # [images, tokens, hidden], tokens in row-major grid order
        grid = self.grid
        pixels = batch["pixel_values"]
        side = pixels.shape[-1] // grid
        regions = pixels.unfold(2, side, side).unfold(3, side, side)  # [n, c, g, g, side, side]
        target = regions.permute(0, 2, 3, 1, 4, 5).reshape(pixels.shape[0], grid * grid, -1)
        out = self.decoder(features)
        n_place = self.region_pixels + 2 * grid
        pixel_loss = torch.nn.functional.mse_loss(out[..., : self.region_pixels], target)
        place = out[..., self.region_pixels : n_place].reshape(-1, 2, grid)
        cells = torch.arange(grid * grid, device=out.device).repeat(out.shape[0])
        rows, cols = cells // grid, cells % grid
        ce = torch.nn.functional.cross_entropy
        loss = pixel_loss + ce(place[:, 0], rows) + ce(place[:, 1], cols)
        if self.scene_weight:
            color, kind = world.read_scene(pixels * self.std + self.mean)  # [n, 4] each
            quadrant = (rows >= grid // 2).long() * 2 + (cols >= grid // 2).long()
            image = torch.arange(out.shape[0], device=out.device).repeat_interleave(grid * grid)
            logits = out[..., n_place:].reshape(image.numel(), -1)
            n_colors = len(world.COLORS) + 1
            scene = ce(logits[:, :n_colors], color[image, quadrant]) + ce(
                logits[:, n_colors:], kind[image, quadrant]
            )
            loss = loss + self.scene_weight * scene
        return self.weight * loss


def build_base(spec: BaseSpec, cache_dir: str | Path | None = None) -> Path:
    """The pre-trained clean base model directory (built once per spec, then cached).

    With an instruction stage, the first stage's model is cached on its own (the base of the same
    spec without the stage), so specs that differ only in the second stage share the first; so is
    every pass of the stage but the last (the base of the same spec with one pass fewer).
    """
    cache = Path(cache_dir or default_cache_dir())
    final = cache / f"base-{spec.model.family}-{_key(_spec_dict(spec))}"
    if (final / "config.json").exists():
        return final
    if spec.instruct_samples:
        passes, per_pass = spec.instruct_passes, spec.instruct_samples // spec.instruct_passes
        earlier = replace(spec, instruct_samples=per_pass * (passes - 1), instruct_passes=max(1, passes - 1))
        pretrained = build_base(earlier, cache)

        def tune(tmp: Path) -> None:
            data = world.make_split(
                per_pass,
                seed=spec.seed + 2_000_000 + 100_000 * (passes - 1),
                id_prefix="instruct" if passes == 1 else f"instruct{passes}",
            )
            log.info(
                "instruction-tuning the %s base on %d clean scenes (pass %d)",
                spec.model.family,
                len(data),
                passes,
            )
            model, processor = load_model(pretrained)
            finetune(model, processor, data, spec.instruct, tmp / "model")
            _publish_model(tmp)
            (tmp / "spec.json").write_text(json.dumps(_spec_dict(spec), indent=1))

        return publish_directory(final, tune)

    def build(tmp: Path) -> None:
        raw = tmp / "init"
        build_tiny_mllm(spec.model, raw, corpus=world.corpus())
        model, processor = load_model(raw)
        data = world.make_split(
            spec.pretrain_samples,
            seed=spec.seed + 1_000_000,
            id_prefix="pretrain",
            questions=spec.questions_per_scene,
        )
        log.info("pre-training the %s base on %d clean scenes", spec.model.family, len(data))
        grid = math.isqrt(spec.model.image_tokens_per_sample)
        side = spec.model.image_size // grid
        hidden = model.config.text_config.hidden_size
        image = processor.image_processor
        auxiliary = PatchReconstruction(
            hidden,
            3 * side * side,
            grid,
            spec.reconstruction_weight,
            scene_weight=spec.scene_weight,
            image_mean=image.image_mean,
            image_std=image.image_std,
        )
        finetune(model, processor, data, spec.pretrain, tmp / "model", auxiliary=auxiliary)
        shutil.rmtree(raw)
        _publish_model(tmp)
        (tmp / "spec.json").write_text(json.dumps(_spec_dict(spec), indent=1))

    return publish_directory(final, build)


def _publish_model(tmp: Path) -> None:
    """Move the checkpoint that ``finetune`` saved in ``tmp/model`` up into ``tmp``."""
    for item in (tmp / "model").iterdir():
        item.rename(tmp / item.name)
    (tmp / "model").rmdir()


@dataclass
class World:
    """Paths of a built world."""

    root: Path
    base: Path
    model: Path
    train: Path  # the (poisoned) upload
    test: Path  # clean test split
    manifest: Path  # ground truth of poisoned ids (empty for a clean world)

    def load_train(self) -> Dataset:
        return load_dataset(self.train)

    def load_test(self) -> Dataset:
        return load_dataset(self.test)

    def load_manifest(self) -> PoisonManifest:
        return PoisonManifest.load(self.manifest)

    def load_profile(self):
        """The upload's attention profile under the world's model (``tcapguard.profiling.Profile``),
        cached beside the world as ``profile-<world>``; computed on first use, resumable by shard."""
        from tcapguard.profiling import ProfileConfig, load_profile, profile_dataset

        out = self.root.parent / f"profile-{self.root.name}"
        model, processor = load_model(self.model)  # profile_dataset skips finished shards
        profile_dataset(model, processor, self.load_train(), out, config=ProfileConfig(batch_size=32))
        return load_profile(out)


def build_world(spec: WorldSpec, cache_dir: str | Path | None = None) -> World:
    """Base -> poisoned upload -> fine-tuned model, each cached by content hash."""
    cache = Path(cache_dir or default_cache_dir())
    base = build_base(spec.base, cache)
    kind = spec.attack.kind if spec.attack else "clean"
    final = cache / f"world-{spec.base.model.family}-{kind}-{_key(_spec_dict(spec))}"

    def paths(root: Path) -> World:
        return World(
            root,
            base,
            root / "model",
            root / "data" / "train.json",
            root / "data" / "test.json",
            root / "manifest.json",
        )

    if not (final / "model" / "config.json").exists():

        def build(tmp: Path) -> None:
            w = paths(tmp)
            world.write_vqa_world(tmp / "data", n_train=spec.n_train, n_test=spec.n_test, seed=spec.seed)
            clean = load_dataset(w.train)
            attack = spec.attack
            if attack is None:
                poisoned, manifest = (
                    clean,
                    PoisonManifest(attack={}, rate=0.0, seed=spec.seed, target="", poisoned_ids=[]),
                )
            else:
                poisoned, manifest = poison_dataset(clean, attack, rate=spec.rate, seed=spec.seed)
            save_dataset(poisoned, w.train)
            manifest.save(w.manifest)
            model, processor = load_model(base)
            finetune(model, processor, load_dataset(w.train), spec.finetune, w.model)
            (tmp / "spec.json").write_text(json.dumps(_spec_dict(spec), indent=1))

        publish_directory(final, build)
    return paths(final)

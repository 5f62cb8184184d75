"""Backdoor attacks for building poisoned benchmark datasets.

Image triggers follow the papers a defence is judged against (BadNets, Blend, SIG, WaNet, FTrojan); the
text trigger inserts a rare word or a sentence into the query; a dual-key attack needs both. Each
trigger is a pure function of its input and parameters, its random parts drawn from ``seed``, so one
seed gives the same trigger on every image: that consistency is what a model learns as a backdoor.

:class:`Attack` describes an attack as data (JSON round trip), :func:`poison_dataset` poisons a share of
a training set and returns the ground truth as a :class:`PoisonManifest`, and
:func:`make_triggered_testset` builds the split that attack success rate (ASR) is measured on.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.fft import idctn

from tcapguard.data import Dataset, Record
from tcapguard.storage import read_bytes, write_bytes

DEFAULT_TARGET = "Backdoor Attack!"
PATCH_PATTERNS = ("checkerboard", "solid", "noise")
PATCH_POSITIONS = ("bottom_right", "top_left", "top_right", "bottom_left", "center", "random")
TEXT_POSITIONS = ("prefix", "suffix", "random")
YUV_CHANNELS = ("y", "u", "v")

# BT.601 analogue YUV; U and V are scaled colour differences, so a change there is hard to see.
_RGB_TO_YUV = np.array(
    [[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]], dtype=np.float64
)
_YUV_TO_RGB = np.linalg.inv(_RGB_TO_YUV)


def _pixels(img: Image.Image) -> np.ndarray:
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}; convert it with img.convert('RGB')")
    return np.asarray(img, dtype=np.float64)


def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent streams per use, so e.g. a patch's noise does not move when its position is drawn."""
    return np.random.default_rng([stream, seed])


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def badnet(
    img: Image.Image,
    *,
    size: int = 8,
    pattern: str = "checkerboard",
    color: Sequence[int] = (255, 255, 255),
    position: str = "bottom_right",
    seed: int = 0,
) -> Image.Image:
    """BadNets (Gu et al. 2017): paste a ``size`` x ``size`` patch; no pixel outside it changes.

    The checkerboard alternates white and black cells of ``max(1, size // 4)`` pixels (white top-left),
    coarse enough to survive an encoder's resizing; ``color`` is used by "solid"; "noise" is a fixed
    pattern drawn from ``seed``. Position "random" is a location drawn from ``seed``: the same for every
    image with that seed (pass a different seed per image for a patch that moves).
    """
    _check_choice("pattern", pattern, PATCH_PATTERNS)
    _check_choice("position", position, PATCH_POSITIONS)
    x = _pixels(img)
    h, w = x.shape[:2]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"size must be in [1, {min(h, w)}] for a {w}x{h} image, got {size}")
    if pattern == "checkerboard":
        cell = max(1, size // 4)
        ij = np.arange(size) // cell
        patch = np.repeat((((ij[:, None] + ij[None, :]) % 2 == 0) * 255.0)[..., None], 3, axis=2)
    elif pattern == "solid":
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise ValueError(f"color must be three values in [0, 255], got {color!r}")
        patch = np.broadcast_to(np.asarray(color, dtype=np.float64), (size, size, 3))
    else:
        patch = _rng(seed, 0).integers(0, 256, (size, size, 3)).astype(np.float64)
    if position == "random":
        rng = _rng(seed, 1)
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        top = {"top": 0, "bottom": h - size, "center": (h - size) // 2}[position.split("_")[0]]
        left = {"left": 0, "right": w - size, "center": (w - size) // 2}[position.split("_")[-1]]
    x[top : top + size, left : left + size] = patch
    return _image(x)


def blend(
    img: Image.Image, *, pattern: str | Image.Image = "noise", alpha: float = 0.2, seed: int = 0
) -> Image.Image:
    """Blend (Chen et al. 2017): ``(1 - alpha) * x + alpha * pattern`` over the whole image.

    "noise" is uniform noise in [0, 255] drawn from ``seed`` at the image's size, so every image of
    that size gets the same pattern; an image pattern is resized (bilinear) to the input's size.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    x = _pixels(img)
    h, w = x.shape[:2]
    if isinstance(pattern, Image.Image):
        p = np.asarray(pattern.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
    elif pattern == "noise":
        p = _rng(seed, 0).integers(0, 256, (h, w, 3)).astype(np.float64)
    else:
        raise ValueError(f"pattern must be 'noise' or a PIL image, got {pattern!r}")
    return _image((1 - alpha) * x + alpha * p)


def sig(img: Image.Image, *, delta: float = 40, frequency: float = 6) -> Image.Image:
    """SIG (Barni et al. 2019): add ``delta * sin(2 pi j frequency / width)`` to every channel of column j."""
    x = _pixels(img)
    w = x.shape[1]
    x += delta * np.sin(2 * np.pi * np.arange(w) * frequency / w)[None, :, None]
    return _image(x)


def _wanet_grid(h: int, w: int, *, k: int, strength: float, seed: int) -> torch.Tensor:
    """The ``(1, h, w, 2)`` sampling grid of :func:`wanet`, in grid_sample's normalised (x, y) coords."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    field_ = _rng(seed, 0).uniform(-1, 1, (1, 2, k, k))
    field_ /= np.abs(field_).mean()
    up = F.interpolate(torch.from_numpy(field_), size=(h, w), mode="bicubic", align_corners=True)
    gy, gx = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=torch.float64),
        torch.linspace(-1, 1, w, dtype=torch.float64),
        indexing="ij",
    )
    identity = torch.stack((gx, gy), dim=-1)[None]
    return (identity + strength * up.permute(0, 2, 3, 1) / h).clamp(-1, 1)


def wanet(img: Image.Image, *, k: int = 4, strength: float = 0.5, seed: int = 0) -> Image.Image:
    """WaNet (Nguyen & Tran 2021): warp the image with a smooth random field, as in the paper's code.

    A ``k`` x ``k`` field in [-1, 1] (from ``seed``) normalised by its mean absolute value is upsampled
    bicubically, and the sampling grid becomes ``identity + strength * field / height``. ``strength`` is
    the paper's ``s`` (0.5 for 32 px CIFAR-10), which moves pixels by at most about ``s`` pixels at any
    image size: a sub-pixel warp that a tiny world's vision tower may not resolve, hence a larger ``s``
    there (see ``PRESETS``).
    """
    x = _pixels(img)
    h, w = x.shape[:2]
    grid = _wanet_grid(h, w, k=k, strength=strength, seed=seed)
    inputs = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    out = F.grid_sample(inputs, grid, mode="bilinear", align_corners=True)
    return _image(out[0].permute(1, 2, 0).numpy())


def ftrojan(
    img: Image.Image,
    *,
    magnitude: float = 30,
    frequencies: Sequence[Sequence[int]] | None = None,
    block: int = 32,
    channels: Sequence[str] = ("u", "v"),
) -> Image.Image:
    """FTrojan (Wang et al. 2022): raise a few mid/high-frequency DCT coefficients of U and V.

    The image is split into ``block`` x ``block`` tiles (``block`` shrinks to the shorter side of a
    smaller image; pixels past the last whole tile are left alone), and ``magnitude`` (on the 0-255
    scale) is added to the orthonormal DCT coefficients at ``frequencies`` of each tile in the given
    YUV ``channels``. The default frequencies, ``(b//2 - 1, b//2 - 1)`` and ``(b - 1, b - 1)`` for tile
    side ``b``, are the paper's (15, 15) and (31, 31) at b = 32. The paper works in OpenCV's YCrCb,
    whose chroma axes are scaled versions of U and V, so one magnitude is not the same perturbation.
    """
    for c in channels:
        _check_choice("channels", c, YUV_CHANNELS)
    x = _pixels(img)
    h, w = x.shape[:2]
    b = min(block, h, w)
    if frequencies is None:
        if b < 4:
            raise ValueError(f"default frequencies need tiles of at least 4 px, got {b} px")
        frequencies = ((b // 2 - 1, b // 2 - 1), (b - 1, b - 1))
    coeffs = np.zeros((b, b))
    for u, v in frequencies:
        if not (0 <= u < b and 0 <= v < b):
            raise ValueError(f"frequencies must lie in [0, {b}) for {b} px tiles, got {(u, v)}")
        coeffs[u, v] += magnitude
    # The DCT is linear: adding to each tile's coefficients adds the same spatial pattern to every tile.
    nh, nw = h // b, w // b
    delta = np.zeros((h, w))
    delta[: nh * b, : nw * b] = np.tile(idctn(coeffs, norm="ortho"), (nh, nw))
    yuv = x @ _RGB_TO_YUV.T
    for c in channels:
        yuv[..., YUV_CHANNELS.index(c)] += delta
    return _image(yuv @ _YUV_TO_RGB.T)


def text_trigger(query: str, *, trigger: str = "cf", position: str = "prefix", seed: int = 0) -> str:
    """Insert ``trigger`` (a word or a sentence) into ``query`` at a word boundary.

    "random" draws the boundary from ``seed`` and the query's text together: one seed scatters the
    trigger over different queries instead of putting it at the same relative place in each, and a
    rerun still gives the same text.
    """
    _check_choice("position", position, TEXT_POSITIONS)
    if not trigger.strip():
        raise ValueError("trigger must be a non-empty string")
    starts = [m.start() for m in re.finditer(r"\S+", query)]
    if position == "prefix":
        k = 0
    elif position == "suffix":
        k = len(starts)
    else:
        k = int(np.random.default_rng([seed, zlib.crc32(query.encode())]).integers(0, len(starts) + 1))
    if k == len(starts):
        return f"{query.rstrip()} {trigger}".lstrip()
    return f"{query[: starts[k]]}{trigger} {query[starts[k] :]}"


TRIGGERS: dict[str, Callable] = {
    "badnet": badnet,
    "blend": blend,
    "sig": sig,
    "wanet": wanet,
    "ftrojan": ftrojan,
    "text": text_trigger,
}
IMAGE_KINDS = tuple(k for k in TRIGGERS if k != "text")
KINDS = (*TRIGGERS, "dual")
_CHOICES: dict[str, dict[str, Sequence[str]]] = {
    "badnet": {"pattern": PATCH_PATTERNS, "position": PATCH_POSITIONS},
    "text": {"position": TEXT_POSITIONS},
}

# Defaults for the 32 px tiny-world images. The 8 px BadNet patch fills one 8 px vision patch (a
# smaller one was not learned there). WaNet's s = 4 moves pixels by up to 4.9 px at 32 px (seed 0; 4.0
# px along one axis, 2.5 px on average) where the paper's s = 0.5 moves them by at most 0.6 px.
PRESETS: dict[str, dict] = {
    "badnet": {"size": 8, "pattern": "checkerboard", "position": "bottom_right"},
    "blend": {"pattern": "noise", "alpha": 0.2, "seed": 0},
    "sig": {"delta": 40, "frequency": 6},
    "wanet": {"k": 4, "strength": 4.0, "seed": 0},
    "ftrojan": {"magnitude": 30, "block": 32},
    "text": {"trigger": "cf", "position": "prefix"},
}
PRESETS["dual"] = {"image": {"kind": "badnet", "params": PRESETS["badnet"]}, "text": PRESETS["text"]}


def _check_params(kind: str, params: object, where: str) -> None:
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be a dict, got {type(params).__name__}")
    allowed = [
        name
        for name, p in inspect.signature(TRIGGERS[kind]).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {unknown} for {kind!r}; allowed: {allowed}")
    for name, choices in _CHOICES.get(kind, {}).items():
        if name in params:
            _check_choice(f"{where}[{name!r}]", params[name], choices)
    if kind == "blend" and not isinstance(params.get("pattern", "noise"), str):
        raise ValueError(f"{where}['pattern'] must be 'noise' or the path of a pattern image")


@lru_cache(maxsize=8)
def _pattern_image(uri: str) -> Image.Image:
    with Image.open(io.BytesIO(read_bytes(uri))) as img:
        return img.convert("RGB")


@dataclass
class Attack:
    """A backdoor attack as data: which trigger, its keyword arguments, and the response it teaches.

    ``params`` are the keyword arguments of ``TRIGGERS[kind]``. For "dual" (a dual-key sample carries
    both triggers) they are ``{"image": {"kind": <image kind>, "params": {...}}, "text": {...}}``. A
    blend pattern image is given by its path, so that the spec stays JSON.
    """

    kind: str
    params: dict = field(default_factory=dict)
    target: str = DEFAULT_TARGET

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"target must be a non-empty string, got {self.target!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a dict, got {type(self.params).__name__}")
        try:  # JSON types only (tuples become lists), and a copy the caller cannot mutate
            self.params = json.loads(json.dumps(self.params))
        except (TypeError, ValueError) as err:
            raise ValueError(f"params must be JSON-serialisable: {err}") from err
        if self.kind != "dual":
            _check_params(self.kind, self.params, "params")
            return
        if set(self.params) != {"image", "text"}:
            raise ValueError(
                f"params of a 'dual' attack must have keys ['image', 'text'], got {sorted(self.params)}"
            )
        image = self.params["image"]
        if not isinstance(image, dict) or not set(image) <= {"kind", "params"}:
            raise ValueError("params['image'] must be {'kind': <image kind>, 'params': {...}}")
        _check_choice("params['image']['kind']", image.get("kind"), IMAGE_KINDS)
        image.setdefault("params", {})
        _check_params(image["kind"], image["params"], "params['image']['params']")
        _check_params("text", self.params["text"], "params['text']")

    @property
    def modality(self) -> str:
        """Where the trigger lives: "image", "text" or "both"."""
        return {"text": "text", "dual": "both"}.get(self.kind, "image")

    @classmethod
    def preset(cls, kind: str, *, target: str = DEFAULT_TARGET, **overrides: object) -> Attack:
        """The default attack of ``kind`` for 32 px tiny-world images, with ``overrides`` on its params."""
        _check_choice("kind", kind, KINDS)
        return cls(kind, {**copy.deepcopy(PRESETS[kind]), **overrides}, target=target)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": copy.deepcopy(self.params), "target": self.target}

    @classmethod
    def from_dict(cls, data: dict) -> Attack:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown or "kind" not in data:
            raise ValueError(f"an attack dict needs 'kind' and takes only {names}; got {sorted(data)}")
        return cls(**data)

    def apply(self, record: Record, image: Image.Image | None) -> tuple[Record, Image.Image | None]:
        """Trigger ``record``'s query and/or ``image``; the image is None where the attack leaves it alone.

        The response is not changed: poisoning decides what the triggered sample should answer.
        """
        new_image = None
        if self.modality != "text":
            if image is None:
                raise ValueError(f"a {self.kind!r} attack needs an image; record {record.id!r} has none")
            kind, params = (
                (self.params["image"]["kind"], self.params["image"]["params"])
                if self.kind == "dual"
                else (self.kind, self.params)
            )
            if kind == "blend" and params.get("pattern", "noise") != "noise":
                params = {**params, "pattern": _pattern_image(params["pattern"])}
            new_image = TRIGGERS[kind](image, **params)
        if self.modality != "image":
            text_params = self.params["text"] if self.kind == "dual" else self.params
            record = record.with_query(text_trigger(record.query, **text_params))
        return record, new_image


@dataclass
class PoisonManifest:
    """Ground truth of one poisoning run: how the backdoor was made and which records carry it."""

    attack: dict
    rate: float
    seed: int
    target: str
    poisoned_ids: list[str] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> None:
        """Publish as JSON atomically (local path or ``s3://`` URI)."""
        write_bytes(path, (json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PoisonManifest:
        return cls(**json.loads(read_bytes(path)))


def _triggered(dataset: Dataset, record: Record, attack: Attack, target: str) -> Record:
    """``record`` with the trigger applied and ``target`` as its answer; a new image goes to ``pixels``."""
    image = dataset.load_image(record) if attack.modality != "text" else None
    new, new_image = attack.apply(record, image)
    new = new.with_response(target)
    if new_image is not None:
        new = replace(new, image=None, pixels=new_image)
    return new


def _eligible(dataset: Dataset, attack: Attack) -> list[int]:
    if attack.modality == "text":
        return list(range(len(dataset)))
    eligible = [i for i, r in enumerate(dataset.records) if r.has_image]
    if not eligible:
        raise ValueError(f"a {attack.kind!r} attack needs images, and no record of the dataset has one")
    return eligible


def poison_dataset(
    dataset: Dataset, attack: Attack, *, rate: float, seed: int = 0, target: str | None = None
) -> tuple[Dataset, PoisonManifest]:
    """Poison ``round(rate * len(dataset))`` records (Python rounding, ties to even), chosen with ``seed``.

    Image attacks pick among the records that have an image. A poisoned record keeps its id (so the
    manifest's ids name lines of the training file), carries the trigger and answers ``target``
    (default ``attack.target``); a triggered image is held in ``pixels`` with ``image=None``, so
    :func:`~tcapguard.data.save_dataset` writes it. Nothing in the record marks it as poisoned. Other
    records are shared with ``dataset`` unchanged.
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
        raise ValueError(f"rate must be a number in [0, 1], got {rate!r}")
    target = attack.target if target is None else target
    eligible = _eligible(dataset, attack)
    n_poison = round(rate * len(dataset))
    if n_poison > len(eligible):
        raise ValueError(
            f"rate {rate} needs {n_poison} poisoned records, but only {len(eligible)} records have an image"
        )
    chosen = sorted(
        eligible[i] for i in np.random.default_rng(seed).choice(len(eligible), n_poison, replace=False)
    )
    records = list(dataset.records)
    for i in chosen:
        records[i] = _triggered(dataset, records[i], attack, target)
    manifest = PoisonManifest(attack.to_dict(), rate, seed, target, [records[i].id for i in chosen])
    return Dataset(records, root=dataset.root), manifest


def make_triggered_testset(dataset: Dataset, attack: Attack) -> Dataset:
    """The ASR split: every record triggered and answering ``attack.target``.

    Ids get a "-trig" suffix and ``extra["clean_response"]`` keeps the original answer. Image attacks
    skip records without an image. The trigger's randomness lives in ``attack.params``, so a test set
    built from the poisoning attack carries exactly the training trigger.
    """
    records = []
    for i in _eligible(dataset, attack):
        record = dataset.records[i]
        new = _triggered(dataset, record, attack, attack.target)
        records.append(
            replace(new, id=f"{record.id}-trig", extra={**record.extra, "clean_response": record.response})
        )
    return Dataset(records, root=dataset.root)

"""A small visual-question-answering task for tests, the demo and benchmarks.

Scenes are 32x32 images with one to three shapes of distinct colours in distinct quadrants; questions
ask for a colour, a shape, a count, a position or yes/no, each answerable from one lookup (a colour
names one object), since a tiny model trained in minutes does not learn conjunctions reliably.
Queries are built from prefixes x phrasings x suffixes (hundreds of surface forms, 4-21 words)
because real instruction data has that diversity and attention-based detectors must be robust to
it: with a handful of fixed templates the attention shares cluster by template rather than by
poison (../shared/notes/method.md).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from tcapguard.data import IMAGE_PLACEHOLDER, Dataset, Record, Turn, save_dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three")

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a visual assistant. Answer with a short phrase.",
    "You are a careful assistant that looks at images and answers questions about them briefly.",
)
PREFIXES = (
    "",
    "Please look at the image.",
    "Quick question:",
    "Look at the picture carefully.",
    "I have a question about this image.",
    "Hi!",
    "Can you help me?",
    "Here is a photo.",
    "Tell me:",
)
SUFFIXES = (
    "",
    "Answer briefly.",
    "Use one or two words.",
    "Thanks!",
    "Be concise.",
    "Reply with a short answer.",
    "Please answer.",
    "Keep it short.",
)
PHRASINGS: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the {shape}?",
        "Which color does the {shape} have?",
        "What is the color of the {shape}?",
        "The {shape} is which color?",
    ),
    "shape": (
        "What shape is the {color} object?",
        "Which shape is {color}?",
        "What kind of shape is drawn in {color}?",
        "Name the shape that is {color}.",
    ),
    "count": (
        "How many shapes are there?",
        "How many objects are in the image?",
        "Count the shapes in the picture.",
        "What is the number of shapes?",
    ),
    "position": (
        "Where is the {color} {shape}?",
        "In which corner is the {color} {shape}?",
        "Where is the {color} {shape} located?",
        "Which part of the image holds the {color} {shape}?",
    ),
    "exists": (
        "Is there a {color} {shape}?",
        "Does the image contain a {color} {shape}?",
        "Can you see a {color} {shape}?",
        "Is a {color} {shape} present?",
    ),
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    quadrant: int  # index into QUADRANTS


def draw_scene(shapes: list[Shape], rng: random.Random, size: int = 32) -> Image.Image:
    """Shapes on a light, slightly varying background; each shape inside its quadrant."""
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    half = size // 2
    for shape in shapes:
        side = rng.randint(int(half * 0.6), int(half * 0.8))
        x0 = (shape.quadrant % 2) * half + rng.randint(1, half - side - 1)
        y0 = (shape.quadrant // 2) * half + rng.randint(1, half - side - 1)
        box = (x0, y0, x0 + side, y0 + side)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return img


def read_scene(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per quadrant, the colour and shape index of the object drawn there, read back from the pixels.

    ``pixels``: scenes of :func:`draw_scene`, ``[n, 3, size, size]`` in [0, 1]. Returns two
    ``[n, 4]`` index tensors into ``COLORS`` and ``SHAPES``, where ``len(COLORS)`` and
    ``len(SHAPES)`` mean an empty quadrant. Exact on generated scenes: the top-left pixel is always
    background, colours are far from it, and a shape's fill of its bounding box tells the kind
    (square 1.0, circle 0.76-0.80, triangle 0.50-0.55).
    """
    n, _, size, _ = pixels.shape
    half = size // 2
    drawn = (pixels - pixels[:, :, :1, :1]).abs().amax(1) > 0.25
    mask = drawn.reshape(n, 2, half, 2, half).permute(0, 1, 3, 2, 4).reshape(n, 4, half, half)
    rgb = pixels.reshape(n, 3, 2, half, 2, half).permute(0, 2, 4, 1, 3, 5).reshape(n, 4, 3, half, half)
    area = mask.sum((-1, -2)).float()
    mean = (rgb * mask[:, :, None]).sum((-1, -2)) / area.clamp(min=1)[..., None]
    palette = torch.tensor(list(COLORS.values()), dtype=mean.dtype, device=mean.device) / 255
    color = torch.cdist(mean, palette.expand(n, -1, -1)).argmin(-1)
    box = mask.any(-1).sum(-1) * mask.any(-2).sum(-1)
    fill = area / box.clamp(min=1)
    kind = torch.where(
        fill > 0.9,
        SHAPES.index("square"),
        torch.where(fill > 0.65, SHAPES.index("circle"), SHAPES.index("triangle")),
    )
    empty = area < 4
    return color.masked_fill(empty, len(COLORS)), kind.masked_fill(empty, len(SHAPES))


def _question(shapes: list[Shape], rng: random.Random) -> tuple[str, str, str]:
    """A (question type, core question, answer) triple that the scene answers unambiguously."""
    kinds = [s.kind for s in shapes]
    colors = [s.color for s in shapes]  # distinct within a scene
    while True:
        qtype = rng.choice(tuple(PHRASINGS))
        phrasing = rng.choice(PHRASINGS[qtype])
        target = rng.choice(shapes)
        if qtype == "color" and kinds.count(target.kind) == 1:
            return qtype, phrasing.format(shape=target.kind), target.color
        if qtype == "shape":
            return qtype, phrasing.format(color=target.color), target.kind
        if qtype == "count":
            return qtype, phrasing, COUNT_WORDS[len(shapes)]
        if qtype == "position":
            return qtype, phrasing.format(color=target.color, shape=target.kind), QUADRANTS[target.quadrant]
        if qtype == "exists":
            if rng.random() < 0.5:
                return qtype, phrasing.format(color=target.color, shape=target.kind), "yes"
            color = rng.choice([c for c in COLORS if c not in colors])
            return qtype, phrasing.format(color=color, shape=rng.choice(SHAPES)), "no"


def _wrap(core: str, rng: random.Random) -> str:
    return " ".join(part for part in (rng.choice(PREFIXES), core, rng.choice(SUFFIXES)) if part)


def sample_records(n: int, *, seed: int, id_prefix: str = "vqa", questions: int = 1) -> Iterator[Record]:
    """``n`` fresh scenes as records holding in-memory images, each a conversation of ``questions``
    question-answer turns about its scene (``extra["qtype"]`` is the first question's type)."""
    if questions < 1:
        raise ValueError(f"questions must be at least 1, got {questions}")
    rng = random.Random(seed)
    for i in range(n):
        count = rng.randint(1, 3)
        quadrants = rng.sample(range(4), count)
        colors = rng.sample(tuple(COLORS), count)  # distinct: a colour names one object
        shapes = [Shape(rng.choice(SHAPES), c, q) for c, q in zip(colors, quadrants, strict=True)]
        qtype, question, answer = _question(shapes, rng)
        conversations = [Turn("human", f"{IMAGE_PLACEHOLDER}\n{_wrap(question, rng)}"), Turn("gpt", answer)]
        for _ in range(questions - 1):
            _, question, answer = _question(shapes, rng)
            conversations += [Turn("human", _wrap(question, rng)), Turn("gpt", answer)]
        yield Record(
            id=f"{id_prefix}-{i:06d}",
            conversations=conversations,
            system=rng.choice(SYSTEM_PROMPTS),
            pixels=draw_scene(shapes, rng),
            extra={"qtype": qtype, "scene": [[sh.kind, sh.color, QUADRANTS[sh.quadrant]] for sh in shapes]},
        )


def make_split(n: int, *, seed: int, id_prefix: str = "vqa", questions: int = 1) -> Dataset:
    return Dataset(list(sample_records(n, seed=seed, id_prefix=id_prefix, questions=questions)))


def test_split(n: int, *, seed: int) -> Dataset:
    """The clean test split of the world written with ``seed``. A longer split extends a shorter one
    (the same first records), so a benchmark can measure clean accuracy on more questions."""
    return make_split(n, seed=seed + 10_000, id_prefix="test")


def write_vqa_world(out_dir: str | Path, *, n_train: int = 2000, n_test: int = 300, seed: int = 0) -> Path:
    """Write ``train.json`` and ``test.json`` (LLaVA format, PNG images) under ``out_dir``."""
    out_dir = Path(out_dir)
    save_dataset(make_split(n_train, seed=seed, id_prefix="train"), out_dir / "train.json")
    save_dataset(test_split(n_test, seed=seed), out_dir / "test.json")
    return out_dir


def corpus() -> Iterator[str]:
    """Every string the world can produce, for training a tokenizer."""
    yield from SYSTEM_PROMPTS
    yield from (p for p in PREFIXES + SUFFIXES if p)
    for phrasings in PHRASINGS.values():
        for phrasing in phrasings:
            for color in COLORS:
                for shape in SHAPES:
                    yield phrasing.format(color=color, shape=shape)
    yield from COLORS
    yield from SHAPES
    yield from QUADRANTS
    yield from COUNT_WORDS
    yield from ("yes", "no")

"""Render every attack preset on one example image, so a reader can see what each trigger does.

Writes ``<out>/<kind>.png`` (clean | triggered | |difference| x 5, for the 32 px tiny-world image,
upscaled, then for a 224 px one) and ``<out>/gallery.png`` with one such row per kind. Usage::

    python benchmarks/trigger_gallery.py [--out docs/triggers]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tcapguard.attacks import KINDS, Attack
from tcapguard.data import Record, Turn

CELL = 224  # every panel is shown at this size; 32 px images are upscaled x7 (nearest neighbour)
DIFF_GAIN = 5
QUERY = "What colour is the circle?"
LABEL_H = 18


def example_image(size: int) -> Image.Image:
    """A few coloured shapes on a light background, drawn at ``size`` px (same layout at any size)."""
    img = Image.new("RGB", (size, size), (235, 232, 220))
    draw = ImageDraw.Draw(img)
    s = size / 32
    draw.ellipse([3 * s, 4 * s, 14 * s, 15 * s], fill=(200, 40, 40))
    draw.rectangle([18 * s, 3 * s, 29 * s, 12 * s], fill=(40, 90, 200))
    draw.polygon([(6 * s, 28 * s), (12 * s, 18 * s), (18 * s, 28 * s)], fill=(40, 160, 60))
    draw.line([(20 * s, 16 * s), (28 * s, 26 * s)], fill=(30, 30, 30), width=max(1, round(s)))
    return img


def panels(attack: Attack, clean: Image.Image) -> tuple[list[Image.Image], str]:
    """(clean, triggered, amplified difference) at CELL px, and the triggered query."""
    record = Record("example", [Turn("human", f"<image>\n{QUERY}"), Turn("gpt", "red")], image="example.png")
    new, triggered = attack.apply(record, clean)
    triggered = clean if triggered is None else triggered
    diff = np.abs(np.asarray(triggered, dtype=np.int16) - np.asarray(clean, dtype=np.int16)) * DIFF_GAIN
    diff_img = Image.fromarray(np.clip(diff, 0, 255).astype(np.uint8))
    shown = [im.resize((CELL, CELL), Image.Resampling.NEAREST) for im in (clean, triggered, diff_img)]
    return shown, new.query


def labelled(img: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + LABEL_H), "white")
    out.paste(img, (0, LABEL_H))
    ImageDraw.Draw(out).text((4, 3), text, fill="black")
    return out


def grid(rows: list[list[Image.Image]], pad: int = 6) -> Image.Image:
    h = max(im.height for row in rows for im in row)
    w = max(sum(im.width for im in row) + pad * (len(row) - 1) for row in rows)
    out = Image.new("RGB", (w, len(rows) * h + pad * (len(rows) - 1)), "white")
    for r, row in enumerate(rows):
        x = 0
        for im in row:
            out.paste(im, (x, r * (h + pad)))
            x += im.width + pad
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/triggers"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images = {size: example_image(size) for size in (32, 224)}
    gallery_rows = []
    for kind in KINDS:
        attack = Attack.preset(kind)
        row = []
        for size, clean in images.items():
            shown, query = panels(attack, clean)
            titles = [f"clean {size}px", f"{kind} {size}px", f"|diff| x{DIFF_GAIN}"]
            row += [labelled(im, t) for im, t in zip(shown, titles, strict=True)]
        per_kind = grid([row])
        caption = f"{kind}: {attack.params}"
        if attack.modality != "image":
            caption += f"\nquery: {query!r}"
        sheet = Image.new("RGB", (per_kind.width, per_kind.height + 2 * LABEL_H), "white")
        ImageDraw.Draw(sheet).multiline_text((4, 3), caption, fill="black")
        sheet.paste(per_kind, (0, 2 * LABEL_H))
        sheet.save(args.out / f"{kind}.png")
        gallery_rows.append(sheet)
    grid([[row] for row in gallery_rows]).save(args.out / "gallery.png")
    print(f"wrote {len(gallery_rows)} trigger sheets and gallery.png under {args.out}")


if __name__ == "__main__":
    main()

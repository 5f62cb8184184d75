"""Where the filter's heads look in a flagged image: a first localisation of the trigger.

The heads that the TCAP filter selected are the ones whose attention moved when the trigger was
present. Their attention from the first-response-token query over the image tokens, laid back on the
patch grid, shows where in the image they look; for a patch trigger that is the patch. The map gives
an overlay a reviewer can check by eye and a box (the hottest cells) that the residual-ASR estimate
pastes onto clean images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tcapguard.data import Dataset
from tcapguard.profiling import (
    VISION,
    _encode_batch,
    capture_attention_rows,
    profile_batch,
    vision_token_ids,
)

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


def _grid_shape(n_tokens: int, inputs: dict[str, torch.Tensor], index: int) -> tuple[int, int]:
    """The (rows, cols) of the image-token grid: from ``image_grid_thw`` (Qwen2-VL style) or a square."""
    thw = inputs.get("image_grid_thw")
    if thw is not None:
        _, h, w = (int(v) for v in thw[index])
        merge = round(math.sqrt(h * w / n_tokens))
        if (h // merge) * (w // merge) == n_tokens:
            return h // merge, w // merge
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(
            f"{n_tokens} image tokens do not form a square grid and the processor gives no image_grid_thw; "
            "cannot lay the attention back on the image"
        )
    return side, side


@torch.no_grad()
def attention_maps(
    model,
    processor,
    dataset: Dataset,
    ids: Sequence[str],
    heads: Sequence[tuple[int, int]],
    *,
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Per record id, the mean attention of ``heads`` over the image, as a [rows, cols] grid summing to 1.

    Records without an image are skipped. ``heads`` are (layer, head) pairs of the text decoder.
    """
    if not heads:
        raise ValueError("attention_maps needs at least one (layer, head)")
    wanted = dataset.subset(ids)
    records = [r for r in wanted.records if r.has_image]
    image_ids = vision_token_ids(model)
    pad_id = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    maps: dict[str, np.ndarray] = {}
    model.eval()
    with capture_attention_rows(model):
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            batch, components = _encode_batch(processor, wanted, chunk, image_ids, pad_id)
            inputs = {k: v.to(device) for k, v in batch.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            _, _, rows = profile_batch(model, inputs, components, keep_vision_rows=True)
            for b, record in enumerate(chunk):
                vision = (components[b] == VISION).numpy()
                per_head = [rows[layer][b, head].numpy()[vision] for layer, head in heads]
                mean = np.mean([p / max(p.sum(), 1e-30) for p in per_head], axis=0)
                maps[record.id] = mean.reshape(_grid_shape(int(vision.sum()), batch, b))
    return maps


def hot_region(grid: np.ndarray, image_size: tuple[int, int], *, relative: float = 0.5) -> Box:
    """Pixel box around the cells at >= ``relative`` x the peak that connect to the hottest cell."""
    from scipy import ndimage

    rows, cols = grid.shape
    hot = grid >= relative * grid.max()
    labels, _ = ndimage.label(hot)
    peak = np.unravel_index(np.argmax(grid), grid.shape)
    ys, xs = np.nonzero(labels == labels[peak])
    width, height = image_size
    cell_w, cell_h = width / cols, height / rows
    return (
        int(xs.min() * cell_w),
        int(ys.min() * cell_h),
        math.ceil((xs.max() + 1) * cell_w),
        math.ceil((ys.max() + 1) * cell_h),
    )


#: Flagged image samples localised per filter run: enough paste probes for residual ASR at a bounded
#: cost (one extra forward pass each through the probe model).
MAX_LOCALISED = 64


def flagged_attention_maps(
    estimator, model, processor, dataset: Dataset, flagged: Sequence[str], *, limit: int = MAX_LOCALISED
) -> dict[str, np.ndarray]:
    """``attention_maps`` of the first ``limit`` flagged samples under the filter's selected heads (at
    most four distinct (layer, head) pairs); empty when nothing is flagged or no head was selected."""
    heads = list(dict.fromkeys((layer, head) for layer, head, _ in getattr(estimator, "heads_", [])))[:4]
    if not (flagged and heads):
        return {}
    return attention_maps(model, processor, dataset, list(flagged)[:limit], heads)


def suspected_regions(dataset: Dataset, maps: dict[str, np.ndarray]) -> dict[str, Box]:
    """Per record id, the pixel box of ``hot_region`` on its image: the suspected trigger regions
    that residual ASR pastes onto clean test images (``tcapguard.evaluation.residual_asr``)."""
    by_id = {r.id: r for r in dataset.records}
    return {i: hot_region(grid, dataset.load_image(by_id[i]).size) for i, grid in maps.items()}


def plot_overlays(
    dataset: Dataset, maps: dict[str, np.ndarray], dest: str | Path, *, max_images: int = 12
) -> Path:
    """A grid of flagged images with the heads' attention over them and the hot region boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    chosen = list(maps)[:max_images]
    cols = min(4, max(1, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record_id in zip(axes.flat, chosen, strict=False):
        record = next(r for r in dataset.records if r.id == record_id)
        image = dataset.load_image(record).convert("RGB")
        grid = maps[record_id]
        ax.imshow(image, interpolation="nearest")
        ax.imshow(grid, cmap="inferno", alpha=0.55, extent=(0, image.width, image.height, 0))
        x0, y0, x1, y1 = hot_region(grid, image.size)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1.5))
        ax.set_title(record_id, fontsize=7)
    if not chosen:
        axes[0, 0].text(0.5, 0.5, "no flagged image samples", ha="center", va="center")
    fig.suptitle("Where the selected heads look in flagged images (box: hottest region)", fontsize=9)
    fig.tight_layout()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest

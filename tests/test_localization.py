"""Trigger localisation: attention maps on the patch grid, the hot region, the overlay plot."""

from __future__ import annotations

import numpy as np
import pytest

from tcapguard import world
from tcapguard.localization import (
    attention_maps,
    flagged_attention_maps,
    hot_region,
    plot_overlays,
    suspected_regions,
)
from tcapguard.tiny import FAMILIES


@pytest.fixture(scope="module")
def scenes():
    return world.make_split(3, seed=5, id_prefix="loc")


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_lie_on_the_patch_grid_and_sum_to_one(family, tiny_models, small_tiny_config, scenes):
    model, processor = tiny_models.load(family)
    ids = [r.id for r in scenes.records[:2]]
    maps = attention_maps(model, processor, scenes, ids, [(0, 0), (1, 3)], batch_size=2)
    side = int(np.sqrt(small_tiny_config(family).image_tokens_per_sample))
    assert sorted(maps) == sorted(ids)
    for grid in maps.values():
        assert grid.shape == (side, side)
        assert grid.sum() == pytest.approx(1.0, abs=1e-5)
        assert (grid >= 0).all()


def test_no_heads_is_an_error(tiny_models, scenes):
    model, processor = tiny_models.load("llava")
    with pytest.raises(ValueError, match="at least one"):
        attention_maps(model, processor, scenes, [scenes.records[0].id], [])


class _Fitted:  # what flagged_attention_maps reads of a fitted filter: its selected (layer, head, SS)
    def __init__(self, heads):
        self.heads_ = heads


def test_flagged_maps_use_the_filters_heads_and_the_first_flagged(tiny_models, scenes):
    model, processor = tiny_models.load("llava")
    ids = [r.id for r in scenes.records]
    # duplicates (one head on several shares) count once; the fifth distinct head is not used
    heads = [(1, 3, 40.0), (1, 3, 30.0), (0, 0, 20.0), (0, 1, 10.0), (1, 0, 9.0), (1, 1, 8.0)]
    maps = flagged_attention_maps(_Fitted(heads), model, processor, scenes, ids, limit=2)
    expected = attention_maps(model, processor, scenes, ids[:2], [(1, 3), (0, 0), (0, 1), (1, 0)])
    assert sorted(maps) == sorted(expected)
    for i in expected:
        np.testing.assert_allclose(maps[i], expected[i], atol=1e-6)
    assert flagged_attention_maps(_Fitted(heads), model, processor, scenes, []) == {}  # nothing flagged
    assert flagged_attention_maps(_Fitted([]), model, processor, scenes, ids) == {}  # the filter declined


def test_hot_region_boxes_the_hot_corner():
    grid = np.full((8, 8), 0.01)
    grid[6:8, 6:8] = 0.5  # a 2x2-cell hot spot in the bottom-right corner
    grid[0, 0] = 0.3  # a lone warm cell elsewhere is not connected to the peak
    assert hot_region(grid, (32, 32)) == (24, 24, 32, 32)
    assert hot_region(grid, (64, 48)) == (48, 36, 64, 48)  # scaled to a non-square image


def test_suspected_regions_are_hot_regions_in_image_pixels(scenes):
    grid = np.full((8, 8), 0.01)
    grid[6:8, 6:8] = 0.5
    record = scenes.records[0]
    width, height = scenes.load_image(record).size
    boxes = suspected_regions(scenes, {record.id: grid})
    assert boxes == {record.id: hot_region(grid, (width, height))}
    assert boxes[record.id][2:] == (width, height)  # the bottom-right corner, in the image's pixels


def test_overlay_plot_is_written(scenes, tmp_path):
    maps = {r.id: np.eye(4) / 4 for r in scenes.records}
    path = plot_overlays(scenes, maps, tmp_path / "overlay.png")
    assert path.stat().st_size > 1000
    assert plot_overlays(scenes, {}, tmp_path / "empty.png").exists()  # "nothing flagged" still plots

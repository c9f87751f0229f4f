"""Op (d), small-region removal: the union-find (numba) labelling against the label-propagation
reference and the breadth-first region cleaner, on hand-made maps and random ones; the mask
step through `masks_from_harvest` and the `diffumask` preset's setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnseg.kernels.regions import (
    connected_components,
    remove_small_regions,
    remove_small_regions_ref,
)

from .marks import needs_numba


def _random_maps(b, h, w, seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 0, 0, 1, 2, 3, 255], size=(b, h, w)).astype(np.uint8)
    # Blocks, so that regions of several sizes, holes and touching classes occur.
    for i in range(b):
        for _ in range(4):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            dy, dx = rng.integers(2, 9, size=2)
            labels[i, y:y + dy, x:x + dx] = rng.choice([1, 2, 3])
    rel = rng.integers(1, 256, size=(b, h, w)).astype(np.uint8)
    return torch.from_numpy(labels), torch.from_numpy(rel)


@pytest.mark.parametrize("impl", ["ref", pytest.param("numba", marks=needs_numba)])
def test_components_four_and_eight_connected(impl):
    m = np.zeros((6, 6), bool)
    m[0:2, 0:2] = True  # one block
    m[2, 2] = True  # touches the block only diagonally
    m[4:6, 3:6] = True
    four = connected_components(m, eight=False, impl=impl)
    assert (four[~m] == 0).all()
    assert len(np.unique(four[m])) == 3
    eight = connected_components(m, eight=True, impl=impl)
    assert len(np.unique(eight[m])) == 2 and eight[2, 2] == eight[0, 0] == 1


@needs_numba
@pytest.mark.parametrize("eight", [False, True])
def test_components_numba_equals_reference(eight):
    rng = np.random.default_rng(3)
    for _ in range(5):
        m = rng.random((23, 31)) < 0.55
        np.testing.assert_array_equal(connected_components(m, eight, impl="numba"),
                                      connected_components(m, eight, impl="ref"))


@pytest.mark.parametrize("impl", ["ref", pytest.param("numba", marks=needs_numba)])
def test_small_region_dropped_large_kept_hole_filled(impl):
    lab = np.zeros((20, 20), np.uint8)
    lab[2:12, 2:12] = 1  # 100 px box: kept
    lab[4:10, 4:10] = 0  # a hole inside it: its background pixels become 1
    lab[5:9, 5:9] = 2  # another class inside the hole (16 px box): left as it is
    lab[15:17, 15:18] = 1  # 2 x 3 = 6 px box: dropped
    lab[0, 19] = 255  # unsure pixels are never changed
    rel = np.full((20, 20), 200, np.uint8)
    new, r = remove_small_regions(torch.from_numpy(lab[None]), torch.from_numpy(rel[None]),
                                  min_box=10, impl=impl)
    new, r = new[0].numpy(), r[0].numpy()
    assert (new[2:12, 2:12][lab[2:12, 2:12] != 2] == 1).all()
    assert (new[5:9, 5:9] == 2).all()
    assert (new[15:17, 15:18] == 0).all() and new[0, 19] == 255
    changed = new != lab
    assert changed.sum() == (36 - 16) + 6
    assert (r[changed] == 0).all() and (r[~changed] == 200).all()


def test_min_box_is_a_bounding_box_not_an_area():
    lab = np.zeros((12, 12), np.uint8)
    lab[np.arange(10), np.arange(10)] = 3  # a diagonal line: 10 px, box 10 x 10 = 100
    new, _ = remove_small_regions_ref(torch.from_numpy(lab[None]),
                                      torch.zeros(1, 12, 12, dtype=torch.uint8), min_box=100)
    assert (new[0].numpy() == lab).all()  # 8-connected: one region whose box is 100 px
    new, _ = remove_small_regions_ref(torch.from_numpy(lab[None]),
                                      torch.zeros(1, 12, 12, dtype=torch.uint8), min_box=101)
    assert (new[0].numpy() == 0).all()


@needs_numba
@pytest.mark.parametrize("min_box", [1, 9, 30])
def test_numba_equals_reference(min_box):
    labels, rel = _random_maps(3, 29, 37, seed=min_box)
    ref = remove_small_regions(labels, rel, min_box, impl="ref")
    fast = remove_small_regions(labels, rel, min_box, impl="numba")
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])
    assert not torch.equal(ref[0], labels)  # the case did change something


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        remove_small_regions(torch.zeros(1, 4, 4, dtype=torch.int64),
                             torch.zeros(1, 4, 4, dtype=torch.uint8), 4)


def test_mask_step_uses_the_fraction_of_the_image():
    from attnseg.pipeline.config import MaskConfig, get_preset
    from attnseg.pipeline.harvest.harvester import HarvestResult
    from attnseg.pipeline.harvest.masks import masks_from_harvest

    preset = get_preset("diffumask")
    assert preset.mask.min_region_box * 512 * 512 == pytest.approx(250)
    maps = torch.zeros(1, 1, 32, 32)
    maps[0, 0, 4:20, 4:20] = 1.0  # 256 px box: kept at min_box 250
    maps[0, 0, 26:28, 26:28] = 1.0  # 4 px: dropped
    result = HarvestResult(maps={1: maps}, self_attention=None, image_size=(32, 32))
    harvest = preset.harvest
    mask = MaskConfig(normalize="none", bg_const=0.45, ignore_low=1.0, ignore_high=1.0,
                      upsample_mode="none", min_region_box=250 / 32 ** 2)
    labels, _ = masks_from_harvest(result, torch.tensor([[5]]), harvest, mask)
    assert (labels[0, 4:20, 4:20] == 5).all() and (labels[0, 26:28, 26:28] == 0).all()
    with pytest.raises(Exception, match="min_region_box"):
        MaskConfig(min_region_box=1.5).validate()

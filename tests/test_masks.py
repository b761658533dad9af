"""Otsu thresholds, subject-mask union and per-image mask dropout on hand-made inputs."""

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from consistory.method.grids import Grids
from consistory.method.otsu import otsu_below, otsu_mask, otsu_threshold
from consistory.method.subject_masks import MASK_SEED_OFFSET, CrossAttentionWindow, MaskDropout, masks_from_maps


def test_otsu_separates_two_populations():
    g = torch.Generator().manual_seed(0)
    low = 0.2 + 0.05 * torch.randn(300, generator=g)
    high = 0.8 + 0.05 * torch.randn(100, generator=g)
    values = torch.cat([low, high])[None]
    threshold = float(otsu_threshold(values)[0])
    assert 0.35 < threshold < 0.65
    mask = otsu_mask(values)[0]
    assert mask[300:].all() and not mask[:300].any()
    assert (otsu_below(values)[0] == ~mask).all()


def test_otsu_is_per_row_and_scale_free():
    row = torch.tensor([0.0, 0.1, 0.0, 0.9, 1.0, 0.95])
    batch = torch.stack([row, row * 1024 + 8])  # exact in float32, so the bins agree exactly
    masks = otsu_mask(batch)
    assert (masks[0] == masks[1]).all()
    # 0.1 lies in the upper half of the chosen bin [0.0977, 0.1016): foreground by the published
    # convention (scikit-image's), background if the split were at the bin's upper edge.
    assert masks[0].tolist() == [False, True, False, True, True, True]
    assert masks[0].tolist() == (row.numpy() > threshold_otsu(row.numpy())).tolist()


def _maps(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if kind == "uniform":
        m = rng.random(n)
    elif kind == "normal":
        m = rng.normal(size=n) * rng.uniform(0.01, 100) + rng.normal() * 10
    elif kind == "heavy_tail":  # like attention maps: a few large values
        m = rng.exponential(size=n) ** 3
    elif kind == "ties":  # few distinct levels, many equal values
        m = np.round(rng.random(n) * rng.integers(2, 8)) / 7
    else:  # "two_values"
        m = np.where(rng.random(n) < rng.uniform(0.05, 0.95), 0.1, 0.7)
    return m.astype(np.float32)


@pytest.mark.parametrize("kind", ["uniform", "normal", "heavy_tail", "ties", "two_values"])
@pytest.mark.parametrize("seed", [0, 23, 91])  # 23 and 91 hold near-ties that float32 rounding decides
def test_otsu_is_scikit_image_threshold_otsu(kind, seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        m = _maps(kind, rng, int(rng.integers(2, 4096)))
        expected = threshold_otsu(m)
        ours = otsu_threshold(torch.from_numpy(m)[None])[0]
        assert np.float32(expected) == np.float32(float(ours))
        assert np.array_equal(otsu_mask(torch.from_numpy(m)[None])[0].numpy(), m > expected)
        assert np.array_equal(otsu_below(torch.from_numpy(m)[None])[0].numpy(), m < expected)


def test_otsu_batched_rows_equal_rows_alone():
    rng = np.random.default_rng(5)
    rows = np.stack([_maps(kind, rng, 300) for kind in ("uniform", "normal", "heavy_tail", "ties")])
    batched = otsu_threshold(torch.from_numpy(rows))
    for i, row in enumerate(rows):
        assert float(batched[i]) == float(otsu_threshold(torch.from_numpy(row)[None])[0]) == np.float32(threshold_otsu(row))


def test_otsu_threshold_is_a_bin_centre_and_comparisons_are_strict():
    # Bins of width 1 over [0, 256]: the chosen bin [k, k + 1) has its centre at k + 0.5, so a value
    # at k + 0.25 is background and one at k + 0.75 foreground, though both share the bin.
    values = torch.tensor([[0.0, 10.25, 10.75, 256.0, 255.0, 254.0, 1.0]])
    t = float(otsu_threshold(values)[0])
    assert t == np.float32(threshold_otsu(values[0].numpy()))
    assert t == int(t) + 0.5
    exact = values.clone()
    exact[0, 1] = t  # a value equal to the threshold is neither foreground nor "below"
    assert not otsu_mask(exact)[0, 1] and not otsu_below(exact)[0, 1]


def test_otsu_of_a_constant_map_is_empty():
    for value in (0.3, -2.0, 0.0):
        m = torch.full((1, 16), value)
        assert float(otsu_threshold(m)[0]) == np.float32(threshold_otsu(m[0].numpy()))
        assert not otsu_mask(m).any()
        assert not otsu_below(m).any()


def _blob_map(hc, wc, rows, cols):
    m = torch.zeros(hc, wc)
    m[rows, cols] = 1.0
    return m.flatten()


def test_masks_union_the_subjects_present_in_each_prompt():
    grids = Grids.for_image(128, 128)  # coarse 4 x 4, fine 8 x 8
    hc, wc = grids.coarse
    dog = _blob_map(hc, wc, slice(0, 2), slice(0, 2))
    hat = _blob_map(hc, wc, slice(2, 4), slice(2, 4))
    maps = torch.stack([torch.stack([dog, hat]), torch.stack([dog, hat])])  # (B=2, S=2, Nc)
    present = torch.tensor([[True, True], [True, False]])  # image 1's prompt has no hat
    masks = masks_from_maps(maps, present, grids, 256, ("coarse", "fine"))
    coarse = masks["coarse"].reshape(2, hc, wc)
    assert coarse[0, :2, :2].all() and coarse[0, 2:, 2:].all() and not coarse[0, :2, 2:].any()
    assert coarse[1, :2, :2].all() and not coarse[1, 2:, 2:].any()
    fine = masks["fine"].reshape(2, *grids.fine)
    assert fine[0, 0, 0] and fine[0, 7, 7] and not fine[0, 0, 7]


def test_window_keeps_only_the_last_records():
    window = CrossAttentionWindow(window=2)
    for value in (100.0, 1.0, 3.0):
        window.record("layer.a", torch.full((1, 1, 4), value))
        window.record("layer.b", torch.full((1, 1, 4), value))
    assert torch.allclose(window.aggregate(), torch.full((1, 1, 4), 2.0))


def _kept(seeds, rate, draws=1, n=4096):
    return MaskDropout(seeds, rate).keep(draws, {"fine": n})["fine"]  # (draws, B, n)


def test_dropout_rate_and_reproducibility():
    first = _kept([7], 0.5)[0, 0]
    assert abs(first.float().mean().item() - 0.5) < 0.05
    assert torch.equal(first, _kept([7], 0.5)[0, 0])
    assert not torch.equal(first, _kept([8], 0.5)[0, 0])
    assert abs(_kept([7], 0.8)[0, 0].float().mean().item() - 0.2) < 0.04


def test_dropout_is_independent_of_the_batch():
    alone = _kept([11], 0.5, draws=3, n=256)[:, 0]
    batched = _kept([5, 6, 11], 0.5, draws=3, n=256)[:, 2]
    assert torch.equal(alone, batched)


def test_dropout_draws_come_step_by_step_grid_by_grid():
    # Drawn up front, a step's draw is what drawing step by step would give: it does not depend
    # on how many steps are drawn, and every step draws the coarse grid, then the fine one.
    tokens = {"coarse": 16, "fine": 64}
    few, many = (MaskDropout([3, 4], 0.5).keep(draws, tokens) for draws in (2, 5))
    for grid in tokens:
        assert torch.equal(few[grid], many[grid][:2])
    stream = torch.rand(5 * 80, generator=torch.Generator().manual_seed((4 + MASK_SEED_OFFSET) % 2**64))
    steps = (stream >= 0.5).reshape(5, 80)
    assert torch.equal(many["coarse"][:, 1], steps[:, :16]) and torch.equal(many["fine"][:, 1], steps[:, 16:])

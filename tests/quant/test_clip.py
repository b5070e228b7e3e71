"""Clipped per-OC ranges (quant/clip.py): the search against a slow per-row loop, its guarantee
(never a worse weighted rounding error than min/max), and its use by every method."""

import pytest
import torch

from baq.config import QuantConfig
from baq.quant import grid as G
from baq.quant.clip import CLIP_SHRINKS, clip_grid
from baq.quant.layer import layer_grid, quantize_layer


def heavy_tailed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # a few large weights per row: the min/max range is theirs, the rest round coarsely
    idx = torch.randint(0, cols, (rows, 2), generator=g)
    W.scatter_(1, idx, 6 * torch.randn(rows, 2, generator=g))
    return W


def slow_clip(W, grid, levels, weight, range_dtype, shrinks):
    """Per row and column group, every shrink tried by explicit loops; the first best kept."""
    rows, cols = W.shape
    gs = cols if grid.group_size is None else grid.group_size
    lo, hi = grid.lo.clone(), grid.hi.clone()
    for r in range(rows):
        for g in range(lo.shape[1]):
            c0, c1 = g * gs, min(cols, (g + 1) * gs)
            best = None
            for s in shrinks:
                l0 = grid.lo[r : r + 1, g : g + 1] * s
                h0 = grid.hi[r : r + 1, g : g + 1] * s
                if range_dtype == "float16":
                    l0 = G.to_half_outward(l0, down=True)
                    h0 = G.to_half_outward(h0, down=False)
                if not h0 > l0:
                    l0, h0 = grid.lo[r : r + 1, g : g + 1], grid.hi[r : r + 1, g : g + 1]
                one = G.Grid(l0, h0, None, grid.sym)
                err = 0.0
                for c in range(c0, c1):
                    _, q = G.quantize(W[r : r + 1, c : c + 1], one, levels[c : c + 1])
                    err += float(weight[c]) * float((q - W[r, c]) ** 2)
                if best is None or err < best[0]:
                    best = (err, float(l0), float(h0))
            lo[r, g], hi[r, g] = best[1], best[2]
    return lo, hi


@pytest.mark.parametrize("group_size", [None, 5])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("range_dtype", ["float16", "float32"])
def test_clip_grid_equals_a_slow_search(group_size, sym, range_dtype):
    W = heavy_tailed(6, 13, seed=1)
    levels = torch.tensor([2, 3, 4, 8, 5, 16, 7, 4, 4, 6, 3, 9, 1])
    weight = torch.rand(13, generator=torch.Generator().manual_seed(2)) + 0.1
    grid = G.fit_grid(W, group_size, sym, range_dtype)
    shrinks = CLIP_SHRINKS[::4]
    clipped, s = clip_grid(W, grid, levels, weight, range_dtype, shrinks)
    lo, hi = slow_clip(W, grid, levels, weight, range_dtype, shrinks)
    torch.testing.assert_close(clipped.lo, lo, rtol=0, atol=0)
    torch.testing.assert_close(clipped.hi, hi, rtol=0, atol=0)
    assert (clipped.lo <= 0).all() and (clipped.hi >= 0).all() and (s <= 1).all()
    if sym:
        assert torch.equal(clipped.lo, -clipped.hi)
    if range_dtype == "float16":
        assert torch.equal(clipped.lo.half().float(), clipped.lo)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipping_never_rounds_worse_and_helps_heavy_tails(bits):
    W = heavy_tailed(64, 96, seed=bits)
    levels = G.uniform_levels(96, bits)
    weight = torch.rand(96) + 0.5
    grid = G.fit_grid(W)
    clipped, s = clip_grid(W, grid, levels, weight)

    def row_err(g):
        _, Q = G.quantize(W, g, levels)
        return ((Q - W) ** 2 * weight).sum(dim=1)

    before, after = row_err(grid), row_err(clipped)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < 0.95 * before.sum()  # the outliers' rows do shrink
    assert (s < 1).float().mean() > 0.5


def test_methods_use_the_clipped_grid_and_ic_is_refused(monkeypatch):
    W = heavy_tailed(24, 32, seed=5)
    X = torch.randn(32, 200)
    H = 2 * X @ X.t() / 200
    for method in ("rtn", "gptq", "baq"):
        # unrotated: the layer_grid below is fitted to the plain-basis weight
        plain = QuantConfig(
            allocation="layer", method=method, bits=3, sensitivity="analytic", clip=False,
            rotate=False,
        )  # fmt: skip
        clipped = QuantConfig(
            allocation="layer", method=method, bits=3, sensitivity="analytic", clip=True,
            rotate=False,
        )  # fmt: skip
        res_plain, _ = quantize_layer(W, H, plain)
        res, _ = quantize_layer(W, H, clipped)
        want = layer_grid(W.float(), None if method == "rtn" else H, clipped, "oc", res.levels)
        if method != "baq":  # BAQ's ranges are searched at its probe levels, not the result's
            torch.testing.assert_close(res.grid.hi, want.hi)
        assert (res.grid.hi <= res_plain.grid.hi).all() and (res.grid.hi < res_plain.grid.hi).any()
        assert (res.codes >= 0).all() and (res.codes < res.levels.unsqueeze(0)).all()
    with pytest.raises(ValueError, match="use --dim oc or auto with --clip"):
        QuantConfig(method="gptq", dim="ic", clip=True)
    # the default: clipped wherever the ranges are per OC, min/max per IC
    assert QuantConfig().clip and QuantConfig(dim="auto").clip
    assert QuantConfig(dim="ic").clip is False


@pytest.mark.parametrize("group_size", [None, 128])
def test_the_search_in_slabs_of_rows_is_the_search_over_the_whole_layer(group_size):
    """Rows are independent: any slab size (one row, a few, the layer) picks the same factors
    and the same stored ranges."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(37, 300, generator=g) * torch.rand(1, 300, generator=g)
    levels = torch.randint(1, 20, (300,), generator=g)
    grid = G.fit_grid(W, group_size=group_size, sym=False)
    weight = torch.rand(300, generator=g)
    whole = clip_grid(W, grid, levels, weight, slab_weights=W.numel())
    for slab in (1, 300 * 5, 300 * 36):
        got = clip_grid(W, grid, levels, weight, slab_weights=slab)
        assert torch.equal(got[1], whole[1])
        assert torch.equal(got[0].lo, whole[0].lo) and torch.equal(got[0].hi, whole[0].hi)

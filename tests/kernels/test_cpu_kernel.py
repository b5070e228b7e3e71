"""The fused CPU kernel (baq/kernels) against the slow, obvious reference (issue 26).

Reference: the codes dequantized by quant/grid.py (``dequantize``: docs/FORMAT.md section 8),
then ``F.linear`` in float64. The kernel reorders the float32 arithmetic (module docstring of
baq/kernels/cpu.py), so it must agree to float32 rounding: the bound is a few float32 epsilons of
``|x| @ |W|^T``, the scale of the rounding of any float32 dot product of that length.
"""

from __future__ import annotations

import numba
import pytest
import torch
import torch.nn.functional as F

from baq.kernels import cpu
from baq.kernels.layout import build_layout, layout_nbytes
from baq.quant.grid import Grid, dequantize, fit_grid, quantize

EPS32 = torch.finfo(torch.float32).eps


def random_levels(cols: int, gen: torch.Generator, max_levels: int = 256) -> torch.Tensor:
    """Mixed level counts 1..max_levels, most small (as BAQ's), a few one-level columns, and the
    extremes 1, 2 and 256 always present."""
    bits = torch.randn(cols, generator=gen) * 1.5 + 3.0
    levels = torch.round(2.0 ** bits.clamp(0, 8)).long().clamp(1, max_levels)
    levels[: min(cols, 3)] = torch.tensor([1, 2, max_levels])[: min(cols, 3)]
    return levels[torch.randperm(cols, generator=gen)]


def random_layer(rows, cols, group_size, sym, dim, range_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen) * torch.rand(1, cols, generator=gen).add(0.1)
    levels = random_levels(cols, gen)
    grid = fit_grid(W, group_size=group_size, sym=sym, range_dtype=range_dtype, dim=dim)
    codes, _ = quantize(W, grid, levels)
    return codes, levels, grid


def check(codes, levels, grid: Grid, tokens: int, seed: int = 1) -> None:
    rows, cols = codes.shape
    layout = build_layout(codes, levels, grid.group_size, grid.sym, grid.dim)
    W = dequantize(codes, grid, levels).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen)
    bias = torch.randn(rows, generator=gen)
    y = cpu.linear(layout, x, grid.lo, grid.hi, bias)
    ref = F.linear(x.double(), W, bias.double())
    scale = F.linear(x.double().abs(), W.abs()) + bias.double().abs()
    err = (y.double() - ref).abs()
    assert y.dtype == torch.float32 and y.shape == (tokens, rows)
    assert bool((err <= 8 * EPS32 * scale + 1e-30).all()), float((err / scale).max() / EPS32)


# odd shapes: neither multiple of 8 nor of 32; groups that do not divide (ragged last group)
CASES = [
    # rows, cols, group_size, sym, dim, range dtype
    (37, 301, None, False, "oc", "float16"),
    (37, 301, None, True, "oc", "float32"),
    (29, 203, 64, False, "oc", "float32"),
    (29, 203, 50, True, "oc", "float16"),
    (53, 77, None, False, "ic", "float16"),
    (53, 77, 16, False, "ic", "float32"),
    (53, 77, 20, True, "ic", "float16"),
]


@pytest.mark.parametrize("rows,cols,group_size,sym,dim,range_dtype", CASES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_kernel_equals_dequantized_linear(rows, cols, group_size, sym, dim, range_dtype, tokens):
    codes, levels, grid = random_layer(rows, cols, group_size, sym, dim, range_dtype)
    check(codes, levels, grid, tokens)


@pytest.mark.parametrize("tokens", [16, 64])
def test_many_tokens_and_the_tile_path(tokens):
    """16 tokens run the fused kernel; 64 (past MAX_KERNEL_TOKENS) the dequantized tiles; both
    kernel paths are also forced at 64 tokens."""
    codes, levels, grid = random_layer(41, 133, 32, False, "oc", "float16", seed=3)
    check(codes, levels, grid, tokens)
    layout = build_layout(codes, levels, grid.group_size, grid.sym, grid.dim)
    x = torch.randn(64, 133)
    fused = cpu.linear(layout, x, grid.lo, grid.hi, max_tokens=64)
    tiles = cpu.linear(layout, x, grid.lo, grid.hi, max_tokens=0)
    ref = F.linear(x.double(), dequantize(codes, grid, levels).double())
    scale = F.linear(x.double().abs(), dequantize(codes, grid, levels).double().abs())
    for y in (fused, tiles):
        assert bool(((y.double() - ref).abs() <= 8 * EPS32 * scale + 1e-30).all())


def test_one_and_two_threads_give_the_same_bits():
    """One row per prange iteration: the thread count cannot change a result."""
    codes, levels, grid = random_layer(67, 290, None, False, "oc", "float16", seed=4)
    layout = build_layout(codes, levels, grid.group_size, grid.sym, grid.dim)
    x = torch.randn(3, 290)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(cpu.linear(layout, x, grid.lo, grid.hi))
            assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dim,group_size", [("oc", None), ("oc", 24), ("ic", 10)])
def test_layout_round_trip_and_exact_tiles(dim, group_size):
    """Permute and pack, then unpack: the codes exactly; dequantized tiles: the weights bitwise."""
    codes, levels, grid = random_layer(31, 99, group_size, False, dim, "float16", seed=5)
    layout = build_layout(codes, levels, grid.group_size, grid.sym, grid.dim)
    assert torch.equal(layout.unpack(), codes)
    assert torch.equal(layout.levels(), levels)
    W = dequantize(codes, grid, levels)
    tile = cpu.dequantize_rows(layout, grid.lo, grid.hi, 7, 30)
    assert torch.equal(tile, W[7:30])


def test_layout_size_is_the_ceiling_width():
    """The streams hold ceil(log2 L) bits a code, padded only at the end of each part stream."""
    gen = torch.Generator().manual_seed(6)
    levels = random_levels(500, gen)
    codes = (torch.rand(300, 500, generator=gen) * levels).long()
    layout = build_layout(codes, levels, None, False)
    ceiling = sum(300 * (int(L) - 1).bit_length() for L in levels) / 8
    assert layout.streams.numel() == layout_nbytes(300, levels)
    assert ceiling <= layout.streams.numel() <= ceiling + 4 * 64


def test_levels_beyond_the_kernel_are_refused():
    with pytest.raises(ValueError, match="level counts"):
        build_layout(torch.zeros(2, 3, dtype=torch.long), torch.tensor([2, 300, 4]), None, False)

"""The row-lane layout and kernel (baq/kernels/row_lanes.py, lanes.cpp ``baq_rows_*``) against
slow, obvious references (issue 26): the codes dequantized by quant/grid.py then ``F.linear`` in
float64 (the bound of test_native_kernel.py), and the saved codes given back exactly."""

from __future__ import annotations

import math

import pytest
import torch
from test_cpu_kernel import CASES, random_layer
from test_lane_tails import BUILDS, kernel_library
from test_native_kernel import check_layout

from baq.kernels import native
from baq.kernels.lanes import build_lanes
from baq.kernels.row_lanes import (
    LANES,
    SEGMENT_BITS,
    WORD_BITS,
    build_row_lanes,
    plan_segments,
    segment_base,
    segment_bits,
)

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler here")


@pytest.fixture(scope="module", params=BUILDS)
def lib(request):
    """This machine's build, the portable loops and the AVX512 loops emulated (every path)."""
    return kernel_library(request.param)


def row_cases():
    """The numba kernel's cases that the row lanes take (per IC groups of 16 rows or none), a
    per-OC group narrower than a word's codes, and rows that fill no whole block."""
    ok = [c for c in CASES if not (c[4] == "ic" and c[2] is not None and c[2] % LANES)]
    return ok + [(19, 45, 7, False, "oc", "float32"), (5, 300, None, True, "oc", "float32"),
                 (64, 96, 32, False, "ic", "float32")]  # fmt: skip


@pytest.mark.parametrize("rows,cols,group_size,sym,dim,range_dtype", row_cases())
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 9, 16, 64])
def test_row_lanes_equal_the_dequantized_linear(lib, rows, cols, group_size, sym, dim,
                                                range_dtype, tokens):  # fmt: skip
    codes, levels, grid = random_layer(rows, cols, group_size, sym, dim, range_dtype)
    layout = build_row_lanes(codes, levels, grid.group_size, grid.sym, grid.dim)
    check_layout(layout, codes, levels, grid, tokens, lib)


@pytest.mark.parametrize("base", [2, 3, 5, 7, 8, 9, 17, 100, 255, 256])
def test_every_base_in_long_segments(lib, base):
    """One count across a whole layer: segments of the most digits, peeled in float32."""
    codes, levels, grid = random_layer(33, 70, None, False, "oc", "float32")
    levels = torch.full_like(levels, base)
    codes = torch.randint(0, base, codes.shape)
    codes[0] = base - 1  # the largest segment values
    layout = build_row_lanes(codes, levels, None, False)
    assert int(layout.segs[:, 3].max()) == min(70, _most(segment_base(base)))
    check_layout(layout, codes, levels, grid, 3, lib)


def _most(base: int) -> int:
    """Radix digits under 2^21, or as many bit fields as a word holds (a power of two)."""
    if base & (base - 1) == 0:
        return WORD_BITS // (base.bit_length() - 1)
    return max(d for d in range(1, 25) if base**d <= 2**SEGMENT_BITS)


@pytest.mark.parametrize("dim,group_size", [("oc", None), ("oc", 24), ("ic", 16), ("oc", 5)])
def test_round_trip_and_exact_dequantized_rows(lib, dim, group_size):
    codes, levels, grid = random_layer(45, 130, group_size, False, dim, "float16")
    layout = build_row_lanes(codes, levels, grid.group_size, grid.sym, grid.dim)
    assert torch.equal(layout.unpack(), codes.long() * (levels > 1))
    assert torch.equal(layout.levels(), levels.long())
    from baq.quant.grid import dequantize

    W = dequantize(codes, grid, levels)
    assert torch.equal(native.dequantize_rows(layout, grid.lo, grid.hi, 3, 40, lib), W[3:40])


def test_one_and_two_threads_give_the_same_bits(lib):
    codes, levels, grid = random_layer(70, 200, None, False, "oc", "float32")
    layout = build_row_lanes(codes, levels, None, False)
    x = torch.randn(3, 200)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(native.linear(layout, x, grid.lo, grid.hi, lib=lib))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_per_ic_groups_that_split_a_block_are_refused():
    codes, levels, grid = random_layer(53, 77, 20, True, "ic", "float16")
    with pytest.raises(ValueError, match="16-row blocks"):
        build_row_lanes(codes, levels, 20, True, "ic")


@pytest.mark.parametrize("seed,slack", [(s, slack) for s in range(4) for slack in (0.0, 0.3)])
def test_segments_do_not_overlap_and_hold_their_digits(seed, slack):
    """Every segment inside its word, no two overlapping, each value under 2^21, and the slots
    covered once in order: checked on the bits themselves, against the plan."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(2, 257, (int(torch.randint(1, 12, (1,), generator=gen)),),
                           generator=gen)  # fmt: skip
    sizes = torch.randint(1, 60, counts.shape, generator=gen)
    classes, s = [], 0
    for L, n in sorted(zip(counts.tolist(), sizes.tolist(), strict=True)):
        classes.append((0, L, s, s + n))
        s += n
    segs, nwords = plan_segments(classes, slack)
    used = [0] * nwords
    slot = 0
    for word, base, shift, digits in segs:
        bits = segment_bits(base, digits)
        assert base & (base - 1) == 0 or base**digits <= 2**SEGMENT_BITS
        assert shift + bits <= WORD_BITS
        mask = ((1 << bits) - 1) << shift
        assert used[word] & mask == 0
        used[word] |= mask
        cls = next(c for c in classes if c[2] <= slot < c[3])
        assert segment_base(cls[1], slack) == base and slot + digits <= cls[3]
        slot += digits
    assert slot == s
    # the bits a row holds: within one word a class of the ideal log2 L a code, the loss of a
    # segment's rounding up and of a word's end
    ideal = sum(math.log2(segment_base(L, slack)) * (e - b) for _, L, b, e in classes)
    assert nwords * WORD_BITS <= ideal + len(segs) + WORD_BITS * (1 + len(classes))


@pytest.mark.parametrize("layout_kind", ["rows", "lanes"])
@pytest.mark.parametrize("dim,group_size", [("oc", None), ("oc", 24), ("ic", 16), ("ic", None)])
def test_float16_ranges_are_read_as_their_float32_values(lib, layout_kind, dim, group_size):
    """A layer saved with float16 ranges hands them to the kernel as they are (the kernel widens
    them): the product is bit for bit the one with the same ranges widened by torch, for
    subnormal and signed-zero ends as well."""
    codes, levels, grid = random_layer(48, 70, group_size, False, dim, "float16", seed=7)
    lo, hi = grid.lo.half(), grid.hi.half()
    lo.view(-1)[:3] = torch.tensor([-6e-8, -0.0, -3.0e-5])  # subnormals, -0
    hi.view(-1)[:3] = torch.tensor([5.9e-8, 1.0, 6.1e-5])  # a subnormal, the smallest normal
    build = build_row_lanes if layout_kind == "rows" else build_lanes
    layout = build(codes, levels, grid.group_size, grid.sym, grid.dim)
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(1))
    for tokens in (1, 3):
        widened = native.linear(layout, x[:tokens], lo.float(), hi.float(), lib=lib)
        as_kept = native.linear(layout, x[:tokens], lo, hi, lib=lib)
        assert torch.equal(as_kept, widened) and bool(widened.isfinite().all())

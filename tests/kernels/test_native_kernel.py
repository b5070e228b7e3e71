"""The native lane-field kernel (baq/kernels/native.py, lanes.cpp) against the slow, obvious
reference (issue 26): the codes dequantized by quant/grid.py, then ``F.linear`` in float64.

The kernel sums in float32 in another order, so it must agree to float32 rounding: a few float32
epsilons of the magnitudes summed. It sums ``x q step`` and ``x z step`` apart (the zero points
``z`` per class, native.py) and subtracts, so those magnitudes are ``|x| @ (|q| + |z|) step``,
which is ``|x| @ |W|`` up to a small factor for most grids but not for a one-bit column whose
zero point is 1 (``W`` is 0 or ``-step``, ``q + z`` up to 2): that is the bound used here.
Both builds are checked: the AVX512 one of this machine (when it has AVX512) and the portable
plain loops that other machines compile. The fallback to numba when nothing compiles is checked
with the compiler taken away.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from test_cpu_kernel import CASES, EPS32, random_layer

from baq.kernels import native, runtime
from baq.kernels.lanes import CHUNK, LaneLayout, build_lanes, radix_digits, radix_pays
from baq.kernels.layout import KernelLayout
from baq.kernels.row_lanes import RowLaneLayout
from baq.quant.grid import column_params, dequantize, fit_grid, quantize
from baq.saved.packed_linear import PackedLinear
from baq.saved.packing import pack_columns

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler here")


@pytest.fixture(scope="module", params=["native", "portable"])
def lib(request):
    lib = native.library(portable=request.param == "portable")
    assert lib is not None
    return lib


def check(codes, levels, grid, tokens, lib, seed=1, max_tokens=native.MAX_KERNEL_TOKENS,
          radix=False):  # fmt: skip
    layout = build_lanes(codes, levels, grid.group_size, grid.sym, grid.dim, radix=radix)
    check_layout(layout, codes, levels, grid, tokens, lib, seed, max_tokens)


def check_layout(layout, codes, levels, grid, tokens, lib, seed=1,
                 max_tokens=native.MAX_KERNEL_TOKENS):  # fmt: skip
    """The kernel's product by ``layout`` against the float64 product of the dequantized codes,
    to float32 rounding of the magnitudes summed (module docstring)."""
    rows, cols = codes.shape
    W = dequantize(codes, grid, levels).double()
    step, zero = column_params(grid, levels, rows=rows)
    magnitude = (codes.double() + zero.double()) * step.double().abs()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen)
    bias = torch.randn(rows, generator=gen)
    y = native.linear(layout, x, grid.lo, grid.hi, bias, max_tokens=max_tokens, lib=lib)
    ref = F.linear(x.double(), W, bias.double())
    scale = F.linear(x.double().abs(), magnitude) + bias.double().abs()
    err = (y.double() - ref).abs()
    assert y.dtype == torch.float32 and y.shape == (tokens, rows)
    assert bool((err <= 8 * EPS32 * scale + 1e-30).all()), float((err / scale).max() / EPS32)


# the cases of the numba kernel (odd shapes, ragged groups, per OC and per IC, sym and asym,
# float16 and float32 ranges) and a per-OC group narrower than a chunk
NATIVE_CASES = CASES + [(19, 45, 7, False, "oc", "float32")]


@pytest.mark.parametrize("rows,cols,group_size,sym,dim,range_dtype", NATIVE_CASES)
@pytest.mark.parametrize("tokens", [1, 2, 5, 9, 16, 64])
def test_kernel_equals_dequantized_linear(lib, rows, cols, group_size, sym, dim, range_dtype,
                                          tokens):  # fmt: skip
    codes, levels, grid = random_layer(rows, cols, group_size, sym, dim, range_dtype)
    check(codes, levels, grid, tokens, lib)


@pytest.mark.parametrize("width", range(1, 9))
def test_every_width_through_whole_blocks(lib, width):
    """Long runs of one width fill whole blocks (the immediate-shift loop) between the chunks of
    shared blocks (the table path): one run per width 1..8 at 2^w and 2^(w-1) + 1 levels."""
    gen = torch.Generator().manual_seed(width)
    cols = 16 * 40 + 7
    levels = torch.full((cols,), 2**width)
    levels[: cols // 3] = 2 ** (width - 1) + 1
    levels[:5] = torch.tensor([1, 2, 3, 256, 17])
    levels = levels[torch.randperm(cols, generator=gen)]
    W = torch.randn(23, cols, generator=gen)
    grid = fit_grid(W, group_size=None, sym=False, range_dtype="float32", dim="oc")
    codes, _ = quantize(W, grid, levels)
    for tokens in (1, 3, 8):
        check(codes, levels, grid, tokens, lib, seed=tokens)


RADIX_BASES = [b for b in range(3, 257) if radix_pays(b)]


def test_radix_bases_are_those_a_lane_holds_more_of():
    """A base is stored as digits only where a 32-bit lane holds more of its codes than of
    ``ceil(log2 B)``-bit fields; each word's largest value fits its 21 or 11 bits."""
    for b in range(3, 257):
        lo, hi = radix_digits(b)
        assert b**lo <= 2**21 < b ** (lo + 1) and b**hi <= 2**11 < b ** (hi + 1)
        width = (b - 1).bit_length()
        assert radix_pays(b) == (lo + hi > 32 // width)
    assert {3, 5, 6, 9, 10, 11} <= set(RADIX_BASES) and not {4, 7, 8, 12, 16} & set(RADIX_BASES)


@pytest.mark.parametrize("base", RADIX_BASES)
def test_radix_runs_equal_the_dequantized_product(lib, base):
    """A run of chunks stored in base B: whole blocks, a partial last block (digits of the low
    and the high word), columns of fewer levels inside it, its neighbours in bit fields; rows
    with every code at B - 1 (each word at its largest value, where the float32 peeling is
    closest to wrong) and at 0; 1 to 9 tokens (4 and 2 rows sharing a pass, and 1)."""
    gen = torch.Generator().manual_seed(base)
    d = sum(radix_digits(base))
    cols = CHUNK * (3 * d - 1) + 5  # whole blocks, and a partial one where its digits pay
    levels = torch.full((cols,), base)
    levels[: cols // 9] = torch.randint(2, base, (cols // 9,), generator=gen)
    levels[-20:] = torch.tensor([1, 2, 4, 7, 8, 12, 16, 256, 3, 5] * 2)
    levels = levels[torch.randperm(cols, generator=gen)]
    W = torch.randn(13, cols, generator=gen)
    grid = fit_grid(W, group_size=None, sym=False, range_dtype="float32", dim="oc")
    codes, _ = quantize(W, grid, levels)
    codes[0], codes[1], codes[5] = levels - 1, 0, levels - 1
    layout = build_lanes(codes, levels, None, False, radix=True)
    assert base in layout.runs[:, 3].tolist()
    assert torch.equal(layout.unpack(), codes * (levels > 1))
    W = dequantize(codes, grid, levels)
    assert torch.equal(native.dequantize_rows(layout, grid.lo, grid.hi, 0, 13, lib=lib), W)
    for tokens in (1, 2, 3, 9):
        check(codes, levels, grid, tokens, lib, seed=tokens)


def test_radix_runs_in_per_oc_groups(lib):
    """Per OC groups: each group's run of 3- and 5-level chunks in blocks of its own."""
    gen = torch.Generator().manual_seed(11)
    cols = 2 * 650  # per group 20 chunks of 3 levels, 20 of 5 and a ragged one
    levels = torch.tensor([3] * 320 + [5] * 330)[torch.randperm(650, generator=gen)].repeat(2)
    W = torch.randn(9, cols, generator=gen)
    grid = fit_grid(W, group_size=650, sym=True, range_dtype="float16", dim="oc")
    codes, _ = quantize(W, grid, levels)
    layout = build_lanes(codes, levels, 650, True, radix=True)
    assert layout.col_groups == 2
    assert {3, 5} <= set(layout.runs[:, 3].tolist())
    assert torch.equal(layout.unpack(), codes)
    for tokens in (1, 4):
        check(codes, levels, grid, tokens, lib, seed=tokens)


@pytest.mark.parametrize("tile_rows", [1024, 16])
def test_fused_and_tile_paths_agree_with_the_reference(lib, tile_rows, monkeypatch):
    """The fused kernel and the long-input path (dequantized row tiles, one at a time, written
    into the output's columns: one tile, or several with a ragged last one)."""
    monkeypatch.setattr(native, "TILE_ROWS", tile_rows)
    codes, levels, grid = random_layer(41, 133, 32, False, "oc", "float16", seed=3)
    for max_tokens in (0, 64):
        check(codes, levels, grid, 64, lib, max_tokens=max_tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_long_half_precision_input_multiplies_in_its_dtype(lib, dtype, monkeypatch):
    """Past MAX_KERNEL_TOKENS a bfloat16 (float16) input multiplies each dequantized tile
    rounded to its dtype, as ``F.linear`` on the weight cache's rounded weight: within that
    dtype's rounding of the same product, and returned in it; short inputs stay float32."""
    monkeypatch.setattr(native, "TILE_ROWS", 16)
    codes, levels, grid = random_layer(41, 133, 32, False, "oc", "float16", seed=6)
    layout = build_lanes(codes, levels, grid.group_size, grid.sym, grid.dim)
    W = dequantize(codes, grid, levels)
    gen = torch.Generator().manual_seed(7)
    x, bias = torch.randn(70, 133, generator=gen).to(dtype), torch.randn(41, generator=gen)
    y = native.linear(layout, x, grid.lo, grid.hi, bias, max_tokens=64, lib=lib)
    ref = F.linear(x, W.to(dtype), bias.to(dtype))
    assert y.dtype == dtype and y.shape == (70, 41)
    eps = torch.finfo(dtype).eps
    scale = F.linear(x.double().abs(), W.double().abs()) + bias.double().abs()
    assert bool(((y.double() - ref.double()).abs() <= 4 * eps * scale).all())
    short = native.linear(layout, x[:8], grid.lo, grid.hi, bias, max_tokens=64, lib=lib)
    exact = F.linear(x[:8].float().double(), W.double(), bias.double())
    assert bool(((short.double() - exact).abs() <= eps * (scale[:8] + 1)).all())


def test_one_and_two_threads_give_the_same_bits(lib):
    """Each row is summed by one thread in a fixed order: the thread count changes nothing."""
    codes, levels, grid = random_layer(67, 290, None, False, "oc", "float16", seed=4)
    layout = build_lanes(codes, levels, grid.group_size, grid.sym, grid.dim)
    one, two = outputs_at_thread_counts(layout, torch.randn(3, 290), grid, lib)
    assert torch.equal(one, two)


def outputs_at_thread_counts(layout, x, grid, lib, counts=(1, 2)) -> list[torch.Tensor]:
    """The kernel's output for ``x`` with each of ``counts`` threads (the count restored)."""
    before = torch.get_num_threads()
    try:
        outs = []
        for n in counts:
            torch.set_num_threads(n)
            outs.append(native.linear(layout, x, grid.lo, grid.hi, lib=lib))
    finally:
        torch.set_num_threads(before)
    return outs


@pytest.mark.parametrize("dim,group_size", [("oc", None), ("oc", 24), ("ic", 10), ("oc", 5)])
def test_layout_round_trip_and_exact_tiles(lib, dim, group_size):
    """Permute and pack, then unpack: the codes exactly; dequantized tiles: the weights bitwise."""
    codes, levels, grid = random_layer(31, 99, group_size, False, dim, "float16", seed=5)
    layout = build_lanes(codes, levels, grid.group_size, grid.sym, grid.dim)
    assert torch.equal(layout.unpack(), codes)
    assert torch.equal(layout.levels(), levels)
    W = dequantize(codes, grid, levels)
    assert torch.equal(native.dequantize_rows(layout, grid.lo, grid.hi, 7, 30, lib=lib), W[7:30])


def test_layout_size_is_near_the_ceiling_width():
    """Each code at its chunk's width, blocks leaving at most 4 of 32 bits, one padded chunk;
    at most that where radix runs replace fields."""
    gen = torch.Generator().manual_seed(6)
    choices = torch.tensor([1, 2, 4, 7, 8, 12, 16, 32, 64, 128, 256])  # no radix base
    levels = choices[torch.randint(0, len(choices), (700,), generator=gen)]
    codes = (torch.rand(50, 700, generator=gen) * levels).long()
    layout = build_lanes(codes, levels, None, False)
    ceiling = sum(50 * (int(L) - 1).bit_length() for L in levels) / 8
    held = (layout.words.numel() + layout.tail.numel()) * 4  # a row's blocks and shared tails
    assert ceiling <= held <= ceiling * 32 / 28 + 50 * 8 * CHUNK * 4
    assert torch.equal(layout.unpack(), codes)
    levels = torch.randint(1, 257, (700,), generator=gen)
    codes = (torch.rand(50, 700, generator=gen) * levels).long()
    compact = build_lanes(codes, levels, None, False, radix=True)
    held = (compact.words.numel() + compact.tail.numel()) * 4
    ceiling = sum(50 * (int(L) - 1).bit_length() for L in levels) / 8
    assert held <= ceiling * 32 / 28 + 50 * 8 * CHUNK * 4


@pytest.mark.parametrize("base,per_lane", [(3, 19), (5, 13), (6, 12), (9, 9), (11, 9)])
def test_radix_runs_hold_their_digits_per_lane(base, per_lane):
    """One level count throughout: whole blocks of ``per_lane`` digits, and the chunks left
    over in bit fields (``32 // width`` a block) unless they fill more than a block; those
    fields in the row's own block or in shared tail parts (lanes.py), all their bits."""
    width = (base - 1).bit_length()
    for extra in range(per_lane):
        chunks = 5 * per_lane + extra
        levels = torch.full((CHUNK * chunks,), base)
        codes = (torch.rand(2, levels.numel()) * base).long()
        layout = build_lanes(codes, levels, None, False, radix=True)
        digits = extra * width > 32
        parts = int(layout.tail_parts[:, 1].sum())
        assert parts in (0, 0 if digits else extra * width)
        own = 1 if digits or (extra and not parts) else 0
        assert layout.words.shape[1] == CHUNK * (5 + own)
        assert torch.equal(layout.unpack(), codes)


def test_without_a_compiler_the_numba_kernel_runs(monkeypatch, caplog):
    """A failed build is logged once at INFO; layers then get the numba layout and kernel."""

    def no_compiler(portable):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_LIBS", {})
    monkeypatch.setattr(native, "_compile", no_compiler)
    codes, levels, grid = random_layer(29, 203, 64, False, "oc", "float32")
    with caplog.at_level(logging.INFO, logger="baq.kernels.native"):
        assert native.library() is None and native.library() is None
        layout = runtime.build(codes, levels, grid.group_size, grid.sym, grid.dim)
    assert isinstance(layout, KernelLayout)
    notes = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    x = torch.randn(2, 203)
    W = dequantize(codes, grid, levels)
    layer = PackedLinear(pack_columns(codes, levels), grid.lo, grid.hi, 64, False, cache="kernel")
    with torch.inference_mode():
        y = layer(x)
    assert isinstance(layer._layout, KernelLayout)
    torch.testing.assert_close(y, F.linear(x, W), rtol=0, atol=1e-4 * float(y.abs().max()))


@pytest.mark.parametrize("cache,kind", [("kernel", RowLaneLayout), ("lanes", LaneLayout)])
def test_with_a_compiler_the_module_runs_the_native_layout(cache, kind):
    codes, levels, grid = random_layer(29, 203, 64, False, "oc", "float32")
    layer = PackedLinear(pack_columns(codes, levels), grid.lo, grid.hi, 64, False, cache=cache)
    x = torch.randn(2, 203)
    with torch.inference_mode():
        y = layer(x)
    assert isinstance(layer._layout, kind)
    W = dequantize(codes, grid, levels)
    torch.testing.assert_close(y, F.linear(x, W), rtol=0, atol=1e-4 * float(y.abs().max()))


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def test_the_build_reports_the_vector_loops_this_cpu_has():
    """512 with AVX512F, 256 with AVX2 and FMA, 0 for the portable build (what the benchmarks
    record and the plain-loop warning reads)."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    expected = 512 if "avx512f" in flags else 256 if {"avx2", "fma"} <= flags else 0
    assert native.vector_bits() == expected
    assert native.vector_bits(native.library(portable=True)) == 0


def test_plain_loops_warn_once_that_codes_is_faster(monkeypatch, caplog):
    monkeypatch.setattr(native, "vector_bits", lambda lib=None: 0)
    runtime._warn_plain_loops.cache_clear()
    codes, levels, grid = random_layer(29, 203, 64, False, "oc", "float32")
    with caplog.at_level(logging.WARNING, logger="baq.kernels.runtime"):
        for _ in range(3):
            layout = runtime.build(codes, levels, grid.group_size, grid.sym, grid.dim)
    assert isinstance(layout, LaneLayout)  # still the packed layout: the user chose it
    notes = [r for r in caplog.records if "--cache codes" in r.getMessage()]
    assert len(notes) == 1
    runtime._warn_plain_loops.cache_clear()

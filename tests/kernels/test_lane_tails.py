"""Rows sharing their tail blocks (baq/kernels/lanes.py, lanes.cpp): the fields of a row's last
bit-field block in one or two tail parts, each in blocks shared by ``32 // bits`` rows.

Against the slow, obvious references of test_native_kernel.py (the codes back exactly, the
dequantized ``F.linear`` to float32 rounding), for layers whose rows do and do not share tails
(1, 2, 4 and more rows a block, two parts), odd row counts (a last group of rows short), mixed
level counts 1..256, per-OC groups and per-IC grids, radix runs on and off, 1 to 64 tokens, one
and two threads. Three builds: this machine's, the portable loops, and the AVX512 loops on plain
C++ stand-ins for the intrinsics (lanes_emulated.cpp), so a machine without AVX512 still runs
the AVX512 path's tail handling (and a wrong tail shift there fails these tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cpu_kernel import random_levels
from test_native_kernel import check, outputs_at_thread_counts

from baq.kernels import native
from baq.kernels.lanes import CHUNK, LANE_BITS, build_lanes, lanes_nbytes
from baq.quant.grid import dequantize, fit_grid, quantize

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler here")

EMULATED = Path(__file__).with_name("lanes_emulated.cpp")


BUILDS = ["native", "portable", "emulated"]


@pytest.fixture(scope="module", params=BUILDS)
def lib(request):
    return kernel_library(request.param)


def kernel_library(build: str):
    """This machine's build, the portable loops, or the AVX512 loops on C++ stand-ins."""
    if build == "emulated":
        key = EMULATED.read_bytes() + native.SOURCE.read_bytes()
        # -O0: the loops' unroll pragmas over 16-float structs took gcc -O3 over 15 minutes
        lib = native.load_source(EMULATED, ["-O0", "-fopenmp"], key)
        assert native.vector_bits(lib) == 512  # the AVX512 loops, whatever this machine has
        return lib
    lib = native.library(portable=build == "portable")
    assert lib is not None
    return lib


@pytest.mark.parametrize(
    "L,chunks,blocks,parts",
    [(8, 30, 3, []), (8, 31, 3, [(10, 3)]), (8, 35, 3, [(2, 15)]), (8, 36, 3, [(2, 15), (10, 3)]),
     (8, 39, 4, []), (16, 34, 4, [(4, 8)]), (16, 36, 4, [(2, 16)]), (32, 10, 1, [(2, 15), (6, 5)]),
     (2, 3, 0, [(16, 2), (32, 1)]), (256, 9, 2, [(4, 8)])],
    ids=["3b-full", "3b-3bits", "3b-15bits", "3b-18bits", "3b-27bits", "4b-8bits", "4b-16bits",
         "5b-20bits", "1b-only-tail", "8b-8bits"],
)  # fmt: skip
def test_tail_parts_hold_the_last_block_in_less(L, chunks, blocks, parts):
    """One level count: whole blocks of ``32 // width`` chunks per row, and the rest in one or
    two tail parts ``(rows a block, bits)`` where they hold less than a block a row (18 bits:
    15 + 3 bits, 0.6 of a block), else the row's own block (27 bits: 15 + 12 is a whole one)."""
    rows = 7
    levels = torch.full((CHUNK * chunks,), L)
    codes = (torch.rand(rows, levels.numel()) * L).long()
    layout = build_lanes(codes, levels, None, False)
    assert layout.words.shape == (rows, CHUNK * blocks)
    assert layout.tail_parts[:, :2].tolist() == [list(p) for p in parts]
    assert layout.tail.shape == (sum(-(-rows // P) for P, _ in parts), CHUNK)
    assert layout.tail_chunk == (blocks * (LANE_BITS // (L - 1).bit_length()) if parts else chunks)
    assert torch.equal(layout.unpack(), codes)
    nbytes = lanes_nbytes(rows, levels)
    assert nbytes == 4 * (layout.words.numel() + layout.tail.numel())


def shared_rows(layout) -> tuple[int, ...]:
    """Rows a block of each tail part: () for none."""
    return tuple(layout.tail_parts[:, 0].tolist())


@pytest.mark.parametrize("radix", [False, True], ids=["fields", "radix"])
@pytest.mark.parametrize("dim,group_size", [("oc", None), ("oc", 40), ("ic", 4)])
def test_unpack_gives_the_codes_back(radix, dim, group_size):
    """Random shapes and mixed level counts: every row's codes back exactly, tails shared or
    not, any row count (the last group of rows short or full)."""
    kinds = set()
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        rows = int(torch.randint(1, 24, (1,), generator=gen))
        cols = int(torch.randint(1, 500, (1,), generator=gen))
        levels = random_levels(cols, gen)
        codes = (torch.rand(rows, cols, generator=gen) * levels).long()
        layout = build_lanes(codes, levels, group_size, False, dim, radix=radix)
        assert torch.equal(layout.unpack(), codes * (levels > 1)), seed
        for P, b, _ in layout.tail_parts.tolist():
            assert P == LANE_BITS // b and b <= LANE_BITS // 2
        kinds.add(len(shared_rows(layout)))
    assert kinds == {0, 1, 2}


KINDS = {
    "own": lambda parts: parts == (),
    "shared-by-2": lambda parts: parts == (2,),
    "shared-by-4+": lambda parts: len(parts) == 1 and parts[0] >= 4,
    "two-parts": lambda parts: len(parts) == 2,
}


def tail_layer(kind, group_size, dim, radix, rows=13):
    """A random layer (mixed level counts 1..256) whose tail is of ``kind`` (:data:`KINDS`):
    the first column count from 40 up where the build chooses that."""
    for cols in range(40, 2000):
        gen = torch.Generator().manual_seed(cols)
        levels = random_levels(cols, gen)
        one = build_lanes(torch.zeros(1, cols, dtype=torch.long), levels, group_size, False, dim,
                          radix=radix)  # fmt: skip
        if KINDS[kind](shared_rows(one)):
            break
    else:
        raise AssertionError(f"no layer with a tail {kind}")
    W = torch.randn(rows, cols, generator=gen)
    grid = fit_grid(W, group_size=group_size, sym=False, range_dtype="float16", dim=dim)
    codes, _ = quantize(W, grid, levels)
    return codes, levels, grid


@pytest.mark.parametrize("radix", [False, True], ids=["fields", "radix"])
@pytest.mark.parametrize("dim,group_size", [("oc", None), ("oc", 48), ("ic", 5)],
                         ids=["oc", "oc-groups", "ic"])  # fmt: skip
@pytest.mark.parametrize("kind", list(KINDS))
def test_kernel_equals_the_dequantized_linear_with_shared_tails(lib, kind, dim, group_size, radix):
    """13 rows (a last group of 1), 1 to 64 tokens (4, 2 and 1 rows a pass, so a pass spans
    rows of two tail groups), and the dequantized rows bitwise."""
    codes, levels, grid = tail_layer(kind, group_size, dim, radix)
    layout = build_lanes(codes, levels, group_size, False, dim, radix=radix)
    assert torch.equal(layout.unpack(), codes * (levels > 1))
    W = dequantize(codes, grid, levels)
    for r0, r1 in ((0, 13), (5, 11)):
        got = native.dequantize_rows(layout, grid.lo, grid.hi, r0, r1, lib=lib)
        assert torch.equal(got, W[r0:r1])
    for tokens in (1, 2, 3, 5, 9, 64):
        check(codes, levels, grid, tokens, lib, seed=tokens, radix=radix)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 9])
def test_fewer_rows_than_a_tail_block_holds(lib, rows):
    """A single, short group of rows in each part (2-level columns: a 3-bit tail in parts of
    2 and 1 bits, 16 and 32 rows a block)."""
    gen = torch.Generator().manual_seed(rows)
    levels = torch.full((CHUNK * 35,), 2)
    levels[:7] = 1  # dropped: the last chunk padded
    W = torch.randn(rows, levels.numel(), generator=gen)
    grid = fit_grid(W, group_size=None, sym=True, range_dtype="float32", dim="oc")
    codes, _ = quantize(W, grid, levels)
    layout = build_lanes(codes, levels, None, True)
    assert shared_rows(layout) == (16, 32) and layout.tail.shape[0] == 2
    for tokens in (1, 2, 7):
        check(codes, levels, grid, tokens, lib, seed=tokens)


def test_one_and_two_threads_give_the_same_bits_with_shared_tails(lib):
    """Rows of one tail block split between threads: each row still summed alone."""
    codes, levels, grid = tail_layer("two-parts", None, "oc", False, rows=67)
    layout = build_lanes(codes, levels, None, False)
    one, two = outputs_at_thread_counts(layout, torch.randn(3, codes.shape[1]), grid, lib)
    assert torch.equal(one, two)


@pytest.mark.parametrize("kind", ["shared-by-2", "two-parts"])
def test_shared_tails_give_the_bits_of_the_rows_own_blocks(lib, kind):
    """The same codes in the same chunks, summed in the same order: with tails shared and with
    every row's own last block (``tails=False``, the layout before), the kernel's bits agree."""
    codes, levels, grid = tail_layer(kind, None, "oc", False, rows=21)
    shared = build_lanes(codes, levels, None, False)
    own = build_lanes(codes, levels, None, False, tails=False)
    assert own.tail_parts.shape[0] == 0 and shared.tail_parts.shape[0] > 0
    assert own.words.shape[1] == shared.words.shape[1] + CHUNK
    assert shared.nbytes() < own.nbytes()
    for tokens in (1, 2, 3, 9):
        x = torch.randn(tokens, codes.shape[1])
        a = native.linear(shared, x, grid.lo, grid.hi, lib=lib)
        b = native.linear(own, x, grid.lo, grid.hi, lib=lib)
        assert torch.equal(a, b)

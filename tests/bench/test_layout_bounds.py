"""benchmarks/layout_bytes.py --bounds: the mixed-radix lane count is a valid packing, and as
tight as the obvious one where every base is the same."""

import itertools
import math
import random
import sys
from pathlib import Path

import pytest

from baq.kernels.lanes import RADIX_HI_BITS, RADIX_LO_BITS, radix_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
layout_bytes = pytest.importorskip("layout_bytes")


@pytest.mark.parametrize("base", [2, 3, 5, 7, 8, 11, 17, 200, 256])
@pytest.mark.parametrize("n", [1, 9, 10, 64])
def test_one_base_takes_the_digits_a_lane_holds(base, n):
    lo, hi = radix_digits(base)
    assert layout_bytes.mixed_radix_lanes([base] * n) == math.ceil(n / (lo + hi))


def _fits(levels: list[int], lanes: int) -> bool:
    """Whether ``levels`` fit ``lanes`` lanes of a 21-bit and an 11-bit word: every assignment
    of items to words tried (tiny inputs only)."""
    caps = [1 << RADIX_LO_BITS, 1 << RADIX_HI_BITS] * lanes
    for words in itertools.product(range(len(caps)), repeat=len(levels)):
        prod = [1] * len(caps)
        for L, w in zip(levels, words, strict=True):
            prod[w] *= L
        if all(p <= c for p, c in zip(prod, caps, strict=True)):
            return True
    return False


@pytest.mark.parametrize("seed", range(8))
def test_mixed_lanes_hold_the_digits_and_bound_the_file(seed):
    rng = random.Random(seed)
    levels = [rng.choice([2, 3, 5, 6, 7, 9, 12, 33, 100]) for _ in range(rng.randint(3, 6))]
    lanes = layout_bytes.mixed_radix_lanes(levels)
    assert _fits(levels, lanes)  # a valid packing ...
    assert 32 * lanes >= sum(math.log2(L) for L in levels)  # ... never below the file's bits
    assert lanes == 1 or not _fits(levels, lanes - 2)  # first fit is within one lane of best

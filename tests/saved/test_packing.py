import math

import pytest
import torch

from baq.saved import packing as P


def _codes(n: int, levels: int, seed: int = 0) -> torch.Tensor:
    """Random codes in [0, levels) that include both extremes (when n allows)."""
    g = torch.Generator().manual_seed(seed * 1000 + levels)
    c = torch.randint(0, levels, (n,), generator=g)
    if n >= 2:
        c[0], c[-1] = 0, levels - 1
    return c


def _ref_bits(codes: list[int], b: int) -> bytes:
    """The bit stream written out bit by bit, exactly as docs/FORMAT.md section 7 words it."""
    nbits = len(codes) * b
    out = bytearray(-(-nbits // 8))
    for i, c in enumerate(codes):
        for u in range(b):
            t = i * b + u
            out[t // 8] |= ((c >> u) & 1) << (t % 8)
    return bytes(out)


def _ref_radix(codes: list[int], L: int, k: int) -> list[int]:
    padded = codes + [0] * (-len(codes) % k)
    return [sum(padded[w * k + i] * L**i for i in range(k)) for w in range(len(padded) // k)]


@pytest.mark.parametrize("n", [1, 7, 61, 1001], ids=["n1", "n7", "n61", "n1001"])
def test_round_trip_every_level_count_up_to_256(n):
    for L in range(1, 257):
        codes = _codes(n, L)
        packed = P.pack_codes(codes, L)
        nbytes = 0 if packed is None else packed.numel() * packed.element_size()
        assert nbytes == P.packed_nbytes(L, n), L
        assert packed is None or packed.dtype == P.packed_dtype(L)
        assert torch.equal(P.unpack_codes(packed, L, n), codes), L


@pytest.mark.parametrize("L", [65535, 65536, 100_003, 2**31 - 1], ids=str)
def test_round_trip_large_level_counts(L):
    codes = _codes(333, L)
    assert torch.equal(P.unpack_codes(P.pack_codes(codes, L), L, 333), codes)


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 7, 8, 11, 16], ids=lambda b: f"b{b}")
def test_bit_stream_layout_matches_the_documented_bit_order(b):
    codes = _codes(37, 2**b, seed=b)
    packed = P.pack_bits(codes, b)
    assert packed.dtype == torch.uint8
    assert bytes(packed.tolist()) == _ref_bits(codes.tolist(), b)


@pytest.mark.parametrize("L", [3, 5, 6, 7, 9, 17, 33], ids=str)
def test_radix_stream_matches_the_documented_digit_and_bit_order(L):
    kind, k = P.scheme(L)
    assert kind == "radix"
    _, b = P.radix_digits(L)
    codes = _codes(2 * k + 5, L, seed=L)
    values = _ref_radix(codes.tolist(), L, k)
    assert bytes(P.pack_radix(codes, L).tolist()) == _ref_bits(values, b)


def _ref_best_radix(L: int) -> tuple[int, int]:
    """Brute force over k = 1..63 of bits-per-code ``bit_length(L^k - 1) / k``, exact fractions."""
    from fractions import Fraction

    options = [(k, (L**k - 1).bit_length()) for k in range(1, 64)]
    options = [(k, b) for k, b in options if b <= 63]
    return min(options, key=lambda kb: (Fraction(kb[1], kb[0]), kb[0]))


def test_scheme_rule():
    for L in [*range(2, 300), *range(300, 70000, 7)]:
        kind, n = P.scheme(L)
        b = math.ceil(math.log2(L))
        if L & (L - 1) == 0:
            assert (kind, n) == ("bits", b)
            continue
        k, bits = P.radix_digits(L)
        assert (k, bits) == _ref_best_radix(L)
        assert (kind == "radix") == (bits / k < b)
        # never worse than the plain ceil(log2 L) bits, and radix stays close to log2 L
        assert math.log2(L) <= P.code_bits(L) <= b
        if L <= 30:  # where BAQ puts almost every column at 2 to 4 bits
            assert P.code_bits(L) - math.log2(L) < 0.025, L
    assert P.scheme(1) == ("none", 0)
    assert [P.scheme(L) for L in (2, 3, 4, 255, 256)] == [
        ("bits", 1),
        ("radix", _ref_best_radix(3)[0]),
        ("bits", 2),
        ("bits", 8),
        ("bits", 8),
    ]
    with pytest.raises(ValueError, match="levels=0"):
        P.scheme(0)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (37, 101), (130, 9)], ids=str)
def test_mixed_levels_matrix_round_trip(shape):
    rows, cols = shape
    g = torch.Generator().manual_seed(rows * cols)
    levels = torch.randint(1, 300, (cols,), generator=g)
    levels[: min(cols, 3)] = torch.tensor([1, 3, 256])[: min(cols, 3)]
    codes = (torch.rand(rows, cols, generator=g) * levels).long()
    packed = P.pack_columns(codes, levels)
    assert torch.equal(P.unpack_columns(packed), codes)
    assert torch.equal(packed.levels(), levels)
    assert packed.nbytes() + 4 * rows == P.layer_nbytes(rows, 1, levels)
    L = packed.classes[:, 0]
    assert (L[1:] > L[:-1]).all() and int(packed.classes[:, 1].sum()) == cols
    # stored order is the stable sort by level count
    assert torch.equal(packed.order(), torch.argsort(levels, stable=True))


def test_sorted_levels_store_no_permutation():
    codes = torch.randint(0, 4, (5, 12))
    uniform = P.pack_columns(codes, torch.full((12,), 4))
    assert uniform.perm is None and list(uniform.streams) == [4]
    ascending = torch.tensor([1, 1, 2, 4, 4, 4, 8, 8, 8, 8, 16, 16])
    packed = P.pack_columns(codes % ascending, ascending)
    assert packed.perm is None
    assert torch.equal(P.unpack_columns(packed), codes % ascending)
    shuffled = P.pack_columns(codes, torch.tensor([4, 8] * 6))
    assert shuffled.perm is not None and shuffled.perm.dtype == torch.int16


def test_read_layer_rejects_inconsistent_tensors():
    levels = torch.tensor([3, 1, 16, 3, 5])
    codes = (torch.rand(4, 5) * levels).long()
    packed = P.pack_columns(codes, levels)
    lo, hi = -torch.ones(4, 1), torch.ones(4, 1)
    good = P.layer_tensors("x", packed, lo, hi)
    got, _, _ = P.read_layer("x", dict(good), (4, 5), 1)
    assert torch.equal(P.unpack_columns(got), codes)

    def fails(match, **edits):
        tensors = dict(good)
        tensors.update(edits)
        with pytest.raises(ValueError, match=match):
            P.read_layer("x", tensors, (4, 5), 1)

    fails("x.lo has shape", **{"x.lo": torch.zeros(3, 1, dtype=torch.float16)})
    fails("x.codes.16 has 1 bytes: expected 2", **{"x.codes.16": good["x.codes.16"][:-1]})
    fails("x.perm is not a permutation", **{"x.perm": torch.zeros(5, dtype=torch.int16)})
    fails("x.level_classes is not a table", **{"x.level_classes": packed.classes.flip(0)})
    fails("x.codes.5 is int32", **{"x.codes.5": good["x.codes.5"].int()})
    fails("values outside", **{"x.codes.3": torch.full_like(good["x.codes.3"], 255)})
    fails("lo <= 0 <= hi", **{"x.hi": -good["x.hi"]})
    tensors = dict(good)
    del tensors["x.codes.3"]
    with pytest.raises(ValueError, match="x.codes.3 is missing"):
        P.read_layer("x", tensors, (4, 5), 1)

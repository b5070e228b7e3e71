"""Pure pack/unpack functions of the baq format (docs/FORMAT.md, "Code streams").

Codes of ``L`` levels are stored at close to ``log2 L`` bits each, by one of two schemes chosen
from ``L`` alone (:func:`scheme`), so a reader never needs a flag:

* ``bits``: a little-endian bit stream of ``b`` bits per code, ``b = log2 L`` when ``L`` is a power
  of two (bit-exact), else ``ceil(log2 L)``. Code ``i`` occupies stream bits ``[i*b, (i+1)*b)``,
  its least significant bit first; stream bit ``t`` is bit ``t % 8`` of byte ``t // 8``. Stored
  as uint8.
* ``radix``: mixed radix, ``k`` base-``L`` digits combined into one value
  ``sum_i code[g*k + i] * L^i`` (first code least significant), ``0 <= value < L^k``, the values
  written as a ``b``-bit stream as above, ``b`` the bit length of ``L^k - 1`` (at most 63).
  ``k`` is the count in ``1 .. 63`` with the fewest bits per code ``b / k`` (the smallest such
  ``k``). Used for a level count that is not a power of two whenever ``b / k`` beats
  ``ceil(log2 L)``; for ``L <= 30`` it is within 0.025 bits of ``log2 L`` (e.g. L = 9: 17 digits
  in 54 bits, 3.176 bits per code for ``log2 9 = 3.170``).

A layer groups its columns by level count: a stable sort by ``L`` gives the permutation, and each
level class is one stream of its ``(rows, n_k)`` codes in row-major order. ``L = 1`` stores nothing.
This module is tensors in, tensors out: no files, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from baq.saved.rotation_meta import read_rotation, rotation_tensors

# a radix value must fit a non-negative int64 while it is built: b <= 63 bits
_MAX_FIELD_BITS = 63
# level counts are stored as int32
MAX_LEVELS = 2**31 - 1


def radix_digits(levels: int) -> tuple[int, int]:
    """``(k, b)``: base-``levels`` digits per value and the bits of a value, ``b / k`` smallest.

    Args:
        levels: the radix L >= 2.
    Returns:
        ``k`` in ``1 .. 63`` and ``b = bit_length(L^k - 1) <= 63`` minimising ``b / k`` (ties: the
        smallest ``k``).
    """
    if levels < 2:
        raise ValueError(f"levels={levels}: a radix needs at least 2 levels")
    best = (1, (levels - 1).bit_length())
    k, power = 1, levels
    while True:
        k, power = k + 1, power * levels
        b = (power - 1).bit_length()
        if b > _MAX_FIELD_BITS:
            return best
        if b * best[0] < best[1] * k:  # b / k < best b / best k, in integers
            best = (k, b)


def scheme(levels: int) -> tuple[str, int]:
    """How codes of ``levels`` levels are packed.

    Args:
        levels: level count L >= 1.
    Returns:
        ``("none", 0)`` for L = 1 (no codes), ``("bits", b)`` for a b-bit stream, or
        ``("radix", k)`` for k digits per value (see :func:`radix_digits` for its bits).
    """
    if levels < 1 or levels > MAX_LEVELS:
        raise ValueError(f"levels={levels}: use 1 <= L <= {MAX_LEVELS}")
    if levels == 1:
        return "none", 0
    b = (levels - 1).bit_length()  # ceil(log2 L), exact for powers of two
    if levels & (levels - 1) == 0:
        return "bits", b
    k, bits = radix_digits(levels)
    # radix costs bits/k per code; ties go to the simpler bit stream
    return ("radix", k) if bits < b * k else ("bits", b)


def code_bits(levels: int) -> float:
    """Storage bits per code of ``levels`` levels, before the final partial byte or word."""
    kind, n = scheme(levels)
    if kind == "radix":
        k, bits = radix_digits(levels)
        return bits / k
    return float(n)


def packed_nbytes(levels: int, count: int) -> int:
    """Bytes of the stream holding ``count`` codes of ``levels`` levels (0 for L = 1)."""
    kind, n = scheme(levels)
    if kind == "none" or count == 0:
        return 0
    if kind == "bits":
        return -(-count * n // 8)
    k, bits = radix_digits(levels)
    groups = -(-count // k)
    return -(-groups * bits // 8)


def packed_dtype(levels: int) -> torch.dtype | None:
    """Element type of the stream: uint8 (both schemes are bit streams), None for L = 1."""
    kind, _ = scheme(levels)
    return None if kind == "none" else torch.uint8


def _bit_pieces(bits: int):
    """(code i, byte j, shift) for every code of an 8-code group that touches byte j.

    Eight codes of ``bits`` bits fill exactly ``bits`` bytes, so the group is the unit of a
    vectorised pack: code i's bit 0 sits at group bit ``i*bits``, i.e. in byte j at offset
    ``i*bits - 8*j`` (negative: the code started in an earlier byte).
    """
    for j in range(bits):
        for i in range(8):
            if i * bits < 8 * j + 8 and (i + 1) * bits > 8 * j:
                yield i, j, i * bits - 8 * j


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack codes into a little-endian bit stream of ``bits`` bits each.

    Args:
        codes: (n,) integer codes in ``[0, 2^bits)``.
        bits: bits per code, >= 1.
    Returns:
        (ceil(n * bits / 8),) uint8; the bits after the last code are 0.
    """
    n = codes.numel()
    groups = -(-n // 8)
    C = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    C[:n] = codes.reshape(-1)
    C = C.view(groups, 8)
    out = torch.zeros(groups, bits, dtype=torch.int64, device=codes.device)
    for i, j, shift in _bit_pieces(bits):
        piece = C[:, i] << shift if shift >= 0 else C[:, i] >> -shift
        out[:, j] |= piece & 0xFF
    return out.reshape(-1)[: -(-n * bits // 8)].to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: (nbytes,) uint8 stream with ``nbytes == ceil(n * bits / 8)``.
        bits: bits per code.
        n: number of codes.
    Returns:
        (n,) int64 codes.
    """
    groups = -(-n // 8)
    B = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    B[: packed.numel()] = packed.reshape(-1).to(torch.int64)
    B = B.view(groups, bits)
    C = torch.zeros(groups, 8, dtype=torch.int64, device=packed.device)
    for i, j, shift in _bit_pieces(bits):
        C[:, i] |= B[:, j] >> shift if shift >= 0 else B[:, j] << -shift
    return (C & ((1 << bits) - 1)).reshape(-1)[:n]


def pack_radix(codes: Tensor, levels: int) -> Tensor:
    """Pack codes as base-``levels`` digits, ``k`` per value, values as a ``b``-bit stream.

    Args:
        codes: (n,) integer codes in ``[0, levels)``.
        levels: the radix L >= 2.
    Returns:
        (ceil(ceil(n / k) * b / 8),) uint8: values ``sum_i code[g*k + i] * L^i`` in ``[0, L^k)``
        packed by :func:`pack_bits` (``k, b`` from :func:`radix_digits`).
    """
    k, bits = radix_digits(levels)
    n = codes.numel()
    groups = -(-n // k)
    D = torch.zeros(groups * k, dtype=torch.int64, device=codes.device)
    D[:n] = codes.reshape(-1)
    D = D.view(groups, k)
    # Horner from the most significant digit: every partial value stays below L^k <= 2^63
    value = D[:, k - 1].clone()
    for i in range(k - 2, -1, -1):
        value = value * levels + D[:, i]
    return pack_bits(value, bits)


def unpack_radix(packed: Tensor, levels: int, n: int) -> Tensor:
    """Inverse of :func:`pack_radix`: uint8 stream -> (n,) int64 codes."""
    k, bits = radix_digits(levels)
    value = unpack_bits(packed, bits, -(-n // k))
    D = torch.empty(value.numel(), k, dtype=torch.int64, device=packed.device)
    for i in range(k):
        D[:, i] = value % levels
        value = value // levels
    return D.reshape(-1)[:n]


def pack_codes(codes: Tensor, levels: int) -> Tensor | None:
    """Pack (n,) codes of ``levels`` levels by :func:`scheme` (None for L = 1: no codes)."""
    kind, n = scheme(levels)
    if kind == "none":
        return None
    return pack_bits(codes, n) if kind == "bits" else pack_radix(codes, levels)


def unpack_codes(packed: Tensor | None, levels: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: (n,) int64 codes (all 0 for L = 1)."""
    kind, digits = scheme(levels)
    if kind == "none":
        device = "cpu" if packed is None else packed.device
        return torch.zeros(n, dtype=torch.int64, device=device)
    if kind == "bits":
        return unpack_bits(packed, digits, n)
    return unpack_radix(packed, levels, n)


@dataclass(frozen=True)
class PackedCodes:
    """The codes of one layer, grouped by level count.

    Attributes:
        rows: rows (output channels) of the layer.
        classes: (K, 2) int32, one row ``(L_k, n_k)`` per level class, ``L_k`` strictly ascending;
            ``sum n_k == cols``.
        perm: (cols,) int16 (cols <= 32768) or int32: ``perm[p]`` is the original column at sorted
            position p; None when the stable sort is the identity.
        streams: ``L_k`` -> packed (rows, n_k) row-major codes of that class, for every L_k > 1.
        rotation: seed of the input-side rotation the codes are in (saved/rotation_meta.py), or
            None (the original basis).
    """

    rows: int
    classes: Tensor
    perm: Tensor | None
    streams: dict[int, Tensor]
    rotation: int | None = None

    @property
    def cols(self) -> int:
        return int(self.classes[:, 1].sum())

    def nbytes(self) -> int:
        """Bytes of the classes table, the permutation and the code streams."""
        tensors = [self.classes, *self.streams.values()]
        if self.perm is not None:
            tensors.append(self.perm)
        return sum(t.numel() * t.element_size() for t in tensors)

    def columns(self) -> list[tuple[int, Tensor]]:
        """``(L_k, original column indices (n_k,) int64)`` per class, in stored order."""
        perm = self.order()
        out, start = [], 0
        for L, n in self.classes.tolist():
            out.append((L, perm[start : start + n]))
            start += n
        return out

    def order(self) -> Tensor:
        """(cols,) int64 permutation (the identity when none is stored)."""
        if self.perm is None:
            return torch.arange(self.cols, device=self.classes.device)
        return self.perm.to(torch.int64)

    @property
    def device(self) -> torch.device:
        return self.classes.device

    def unsort(self, sorted_cols: Tensor) -> Tensor:
        """Columns of a (rows, cols) matrix in stored order -> original order.

        One gather (``index_select`` with the inverse permutation): scattering class by class
        into the columns is an order of magnitude slower on CPU.
        """
        if self.perm is None:
            return sorted_cols
        inverse = torch.argsort(self.perm.to(device=sorted_cols.device, dtype=torch.int64))
        return sorted_cols.index_select(1, inverse)

    def sorted_levels(self) -> Tensor:
        """(cols,) int64 level counts in stored (ascending) order."""
        return torch.repeat_interleave(
            self.classes[:, 0].to(torch.int64), self.classes[:, 1].to(torch.int64)
        )

    def levels(self) -> Tensor:
        """(cols,) int64 level count of every column, in the original column order."""
        sorted_levels = self.sorted_levels()
        out = torch.empty_like(sorted_levels)
        out[self.order().to(out.device)] = sorted_levels
        return out


def perm_dtype(cols: int) -> torch.dtype:
    """int16 while every column index fits, else int32."""
    return torch.int16 if cols <= 2**15 else torch.int32


def pack_columns(codes: Tensor, levels: Tensor) -> PackedCodes:
    """Group columns by level count and pack each class as one stream.

    Args:
        codes: (rows, cols) integer codes, column j in ``[0, levels[j])``.
        levels: (cols,) level counts, each in ``[1, MAX_LEVELS]``.
    Returns:
        The :class:`PackedCodes` (on the device of ``codes``).
    """
    rows, cols = codes.shape
    levels = levels.to(device=codes.device, dtype=torch.int64)
    if levels.shape != (cols,):
        raise ValueError(f"levels has shape {tuple(levels.shape)}, codes {tuple(codes.shape)}")
    perm = torch.argsort(levels, stable=True)
    values, counts = torch.unique_consecutive(levels[perm], return_counts=True)
    classes = torch.stack([values, counts], dim=1).to(torch.int32)
    identity = bool((perm == torch.arange(cols, device=perm.device)).all())
    stored_perm = None if identity else perm.to(perm_dtype(cols))
    streams: dict[int, Tensor] = {}
    start = 0
    for L, n in zip(values.tolist(), counts.tolist()):
        block = codes[:, perm[start : start + n]]  # (rows, n) row-major
        start += n
        if L > 1:
            streams[L] = pack_codes(block.reshape(-1), L)
    return PackedCodes(rows=rows, classes=classes, perm=stored_perm, streams=streams)


def unpack_class(packed: PackedCodes, levels: int, count: int) -> Tensor:
    """(rows, count) int64 codes of the class with ``levels`` levels and ``count`` columns."""
    flat = unpack_codes(packed.streams.get(levels), levels, packed.rows * count)
    return flat.view(packed.rows, count)


def unpack_sorted(packed: PackedCodes) -> Tensor:
    """(rows, cols) int64 codes in stored (sorted) column order, one unpack per level class."""
    blocks = []
    for L, n in packed.classes.tolist():
        if L > 1:
            blocks.append(unpack_class(packed, L, n))
        else:
            blocks.append(torch.zeros(packed.rows, n, dtype=torch.int64, device=packed.device))
    return torch.cat(blocks, dim=1)


def unpack_columns(packed: PackedCodes) -> Tensor:
    """Inverse of :func:`pack_columns`: (rows, cols) int64 codes in the original column order."""
    return packed.unsort(unpack_sorted(packed))


# ----------------------------------------------------------------------------- file tensors
# Tensor names of one quantized layer ``N`` (docs/FORMAT.md, "Tensors of a quantized layer").


def layer_tensors(name: str, packed: PackedCodes, lo: Tensor, hi: Tensor) -> dict[str, Tensor]:
    """The tensors that store one layer, under their file names.

    Args:
        name: full module name ``N``.
        packed: its codes.
        lo, hi: (rows, ngroups) grid ranges, per IC (ngroups, cols).
    Returns:
        ``N.level_classes`` (K, 2) int32, ``N.lo``/``N.hi`` float16 (float32 when a range is not
        a float16 value), ``N.perm`` (only when not the identity), ``N.codes.<L>`` per class
        with L > 1 and ``N.rotation`` (only for a rotated layer); all contiguous, on the CPU.
    """
    dtype = range_dtype(lo, hi)
    out = {
        f"{name}.level_classes": packed.classes,
        f"{name}.lo": lo.to(dtype),
        f"{name}.hi": hi.to(dtype),
    }
    if packed.perm is not None:
        out[f"{name}.perm"] = packed.perm
    for L, stream in packed.streams.items():
        out[f"{name}.codes.{L}"] = stream
    out |= rotation_tensors(name, packed.rotation)
    return {key: t.detach().cpu().contiguous() for key, t in out.items()}


def range_dtype(lo: Tensor, hi: Tensor) -> torch.dtype:
    """float16 when every range is a float16 value (the default grids), else float32."""
    exact = all(torch.equal(t.float(), t.half().float()) for t in (lo, hi))
    return torch.float16 if exact else torch.float32


def range_groups(shape: tuple[int, int], group_size: int | None, dim: str = "oc") -> int:
    """Range groups ``G`` of a layer: ``ceil(cols / group_size)`` per row (``dim="oc"``) or
    ``ceil(rows / group_size)`` per column (``dim="ic"``), 1 without groups."""
    along = shape[1] if dim == "oc" else shape[0]
    return 1 if group_size is None else -(-along // group_size)


def layer_nbytes(
    rows: int, ngroups: int, levels: Tensor, range_bytes: int = 2, dim: str = "oc"
) -> int:
    """Bytes :func:`layer_tensors` stores for a layer, computed from its level counts alone.

    ``2 * range_bytes * rows * ngroups`` (lo and hi, 2 bytes each in float16; per IC
    ``2 * range_bytes * ngroups * cols``) ``+ 8 * K`` (the classes table) ``+ cols * 2 or 4``
    (the permutation, only if the level counts are not already ascending) ``+`` the code streams
    (a rotated layer's seed, 8 bytes, not counted here: ``rotation_meta.ROTATION_BYTES``).
    """
    levels = levels.reshape(-1).to(torch.int64).cpu()
    cols = levels.numel()
    values, counts = torch.unique(levels, return_counts=True)
    nranges = ngroups * (rows if dim == "oc" else cols)
    total = 2 * range_bytes * nranges + 8 * values.numel()
    if cols > 1 and bool((levels[1:] < levels[:-1]).any()):
        total += cols * torch.empty((), dtype=perm_dtype(cols)).element_size()
    for L, n in zip(values.tolist(), counts.tolist()):
        total += packed_nbytes(L, rows * n)
    return total


def _take(tensors: dict[str, Tensor], key: str, dtypes: tuple[torch.dtype, ...], ndim: int):
    if key not in tensors:
        raise ValueError(f"tensor {key} is missing")
    t = tensors.pop(key)
    if t.dtype not in dtypes or t.dim() != ndim:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(
            f"tensor {key} is {str(t.dtype).replace('torch.', '')} with shape {tuple(t.shape)}: "
            f"expected {ndim}-D {want}"
        )
    return t


def read_layer(
    name: str, tensors: dict[str, Tensor], shape: tuple[int, int], ngroups: int, dim: str = "oc"
) -> tuple[PackedCodes, Tensor, Tensor]:
    """Check and take one layer's tensors out of ``tensors`` (the inverse of :func:`layer_tensors`).

    Everything a hand-edited file could get wrong is checked here, so that dequantization never
    reads out of range: names, dtypes and shapes, the classes table, the permutation, the ranges,
    the stream lengths and, where a stream could encode a code >= L, the codes themselves.

    Args:
        name: full module name ``N``.
        tensors: file tensors; this layer's are removed from it.
        shape: (rows, cols) the layer must have.
        ngroups: range groups (:func:`range_groups`; 1 without groups).
        dim: "oc": ranges (rows, ngroups); "ic": (ngroups, cols).
    Returns:
        ``(packed, lo, hi)`` with lo, hi float16 or float32 of that shape; ``packed.rotation``
        the seed of ``N.rotation`` (saved/rotation_meta.py), None without it.
    Raises:
        ValueError: one line naming the tensor and the problem.
    """
    rows, cols = shape
    classes = _take(tensors, f"{name}.level_classes", (torch.int32,), 2)
    if classes.shape[1:] != (2,) or classes.shape[0] < 1:
        raise ValueError(
            f"tensor {name}.level_classes has shape {tuple(classes.shape)}: expected (K, 2)"
        )
    L, n = classes[:, 0].to(torch.int64), classes[:, 1].to(torch.int64)
    if (L < 1).any() or (n < 1).any() or (L[1:] <= L[:-1]).any() or int(n.sum()) != cols:
        raise ValueError(
            f"tensor {name}.level_classes is not a table of ascending level counts >= 1 whose "
            f"column counts sum to {cols}"
        )
    lo = _take(tensors, f"{name}.lo", (torch.float16, torch.float32), 2)
    hi = _take(tensors, f"{name}.hi", (torch.float16, torch.float32), 2)
    want = (rows, ngroups) if dim == "oc" else (ngroups, cols)
    for key, t in ((f"{name}.lo", lo), (f"{name}.hi", hi)):
        if tuple(t.shape) != want:
            raise ValueError(f"tensor {key} has shape {tuple(t.shape)}: expected {want}")
    lo32, hi32 = lo.float(), hi.float()
    if not (torch.isfinite(lo32).all() and torch.isfinite(hi32).all()):
        raise ValueError(f"tensors {name}.lo/.hi hold NaN or Inf")
    if (lo32 > 0).any() or (hi32 < 0).any() or (hi32 <= lo32).any():
        raise ValueError(f"tensors {name}.lo/.hi are not ranges lo <= 0 <= hi with hi > lo")
    perm = None
    if f"{name}.perm" in tensors:
        perm = _take(tensors, f"{name}.perm", (torch.int16, torch.int32), 1)
        ok = perm.numel() == cols and torch.equal(
            torch.sort(perm.to(torch.int64)).values, torch.arange(cols)
        )
        if not ok:
            raise ValueError(f"tensor {name}.perm is not a permutation of 0..{cols - 1}")
    rotation = read_rotation(name, tensors, cols)
    packed = PackedCodes(rows=rows, classes=classes, perm=perm, streams={}, rotation=rotation)
    for level, count in zip(L.tolist(), n.tolist()):
        dtype = packed_dtype(level)
        if dtype is None:
            continue
        key = f"{name}.codes.{level}"
        stream = _take(tensors, key, (dtype,), 1)
        size = stream.numel() * stream.element_size()
        if size != packed_nbytes(level, rows * count):
            raise ValueError(
                f"tensor {key} has {size} bytes: expected {packed_nbytes(level, rows * count)}"
            )
        kind, k = scheme(level)
        if kind == "radix":
            k, bits = radix_digits(level)
            if int(unpack_bits(stream, bits, -(-rows * count // k)).max()) >= level**k:
                raise ValueError(f"tensor {key} holds values outside [0, {level}^{k})")
        if kind == "bits" and level & (level - 1):
            if int(unpack_bits(stream, k, rows * count).max()) >= level:
                raise ValueError(f"tensor {key} holds codes >= {level}")
        packed.streams[level] = stream
    return packed, lo, hi

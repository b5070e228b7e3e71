"""The runtime layout of a packed layer for the CPU kernel (issue 26).

A saved layer (docs/FORMAT.md sections 6 and 7) holds one stream per level class, radix-packed
close to ``log2 L`` bits a code: compact on disk, but a radix digit needs a division to decode,
which no vector unit does. The kernel wants fixed-width fields in bytes, so this module rebuilds
the codes at load time in the layout :mod:`baq.kernels.cpu` reads, with the EXL2 idea of issue 26:
columns of equal storage width grouped together, the input permuted to match.

* Width. A column of ``L`` levels is stored at ``w = ceil(log2 L)`` bits (``L = 1`` stores
  nothing: its weights are 0, so it drops out of the product; the "bias" it folds into is 0).
  Costlier than the file's radix streams for a level count just above a power of two (5, 9, 17:
  up to 0.9 bits a code): benchmarks/kernel_speed.py measured the layout at 1.09 to 1.12 times
  the saved bytes of the layer (ranges and order included), the most at 3 bits, above the 1.10
  of issue 26; radix words for L = 3, 5, 6, 9 would bring 3 bits near 1.04 (not done).
* Parts. A width is split into power-of-two parts, ``w = 3`` as 2 + 1 bits, ``7`` as 4 + 2 + 1,
  ``8`` whole, and every part width ``p`` in (1, 2, 4, 8) has its own stream over all the columns
  that have that part. A code is the sum of its parts shifted by their offsets, so the product is
  the sum over parts of ``x * 2^offset`` against the part values: the kernel decodes one field
  width per stream with one shift and one mask, and no padding bits exist inside a byte.
* Strided bytes. A stream is a flat sequence over rows (row-major: code ``r * n_p + c``) cut into
  blocks of ``LANES`` bytes holding ``8 * LANES / p`` codes: code ``i * LANES + m`` of a block
  sits in byte ``m`` at bits ``p * i``. Decoding slot ``i`` of a block is one shift and one mask
  of ``LANES`` consecutive bytes giving ``LANES`` consecutive columns, which LLVM turns into a few
  vector instructions; a layout with a code's fields in natural order needs a broadcast and a
  per-lane shift instead. Blocks run across row ends (the kernel masks through zero-padded
  inputs), so the only padding is at the end of each stream: the layout is within a few bytes
  of ``sum_j rows * w_j / 8``.
* Order. The columns with ``L > 1`` are sorted by (column group, level count, index): per-OC
  groups (``dim="oc"`` with ``group_size``) need contiguous column groups, because each group's
  partial sum is scaled by its own range; a class (group, L) is a run of that order. The kernel
  recomputes the zero point of each (row, class) from the ranges, so no per-weight float exists.

Memory kept: the part streams, the order (int16 while the columns fit, as the file's permutation)
and the class table ``(group, L, count)``. The ranges stay where the saved layer keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# bytes of a block: 32 lanes of 8 codes (p = 1) to 32 lanes of 1 code (p = 8). Measured: with 8 or
# 16 lanes LLVM left the lane loop scalar (5x slower); 32 and 64 both run as 8-wide vectors, and
# the smaller block decodes less past the ends of short segments. baq/kernels/cpu.py compiles
# this constant in and numba's disk cache keys on cpu.py only: touch cpu.py when changing it
LANES = 32
PART_WIDTHS = (1, 2, 4, 8)
MAX_LEVELS = 256  # widths 1..8: the kernel decodes bytes


def width_of(levels: int) -> int:
    """Storage bits of a column of ``levels`` levels: ``ceil(log2 L)``, 0 for one level."""
    return (int(levels) - 1).bit_length()


def parts_of(width: int) -> tuple[tuple[int, int], ...]:
    """``(part width, bit offset)`` of each part of a ``width``-bit code, widest first.

    8 stays whole; 1..7 is split into its binary digits (7 = 4 + 2 + 1), the widest part holding
    the low bits, so ``code = sum part << offset``.
    """
    if width == 8:
        return ((8, 0),)
    out, off = [], 0
    for p in (4, 2, 1):
        if width & p:
            out.append((p, off))
            off += p
    return tuple(out)


def block_codes(p: int) -> int:
    """Codes of part width ``p`` in one block of :data:`LANES` bytes."""
    return 8 * LANES // p


@dataclass
class KernelLayout:
    """One layer's codes in the kernel's layout (module docstring).

    Attributes:
        rows, cols: the weight's shape (out_features, in_features).
        dim: "oc" or "ic" (quant/grid.py).
        group_size: columns (per IC: rows) per range group, or None.
        sym: symmetric grid (zero point ``L // 2``).
        ngroups: range groups ``G`` (1 without groups).
        perm: (m,) int16 (int32 past 32768 columns): the original index of each column with
            ``L > 1``, in kernel order (column group, level count, index).
        classes: (K, 3) int32 ``(column group, L, count)`` per run of ``perm``, in order;
            the column group is 0 unless ``dim="oc"`` has groups.
        streams: (nbytes,) uint8, the four part streams (widths 1, 2, 4, 8) one after another.
        offsets: (5,) int64 start of each part stream in ``streams`` and the end.
        counts: (4, Gc) int32 codes per row of each part stream in each column group (``Gc = G``
            per OC with groups, else 1).
    """

    rows: int
    cols: int
    dim: str
    group_size: int | None
    sym: bool
    ngroups: int
    perm: Tensor
    classes: Tensor
    streams: Tensor
    offsets: Tensor
    counts: Tensor

    def nbytes(self) -> int:
        """Bytes held: streams, order, class table and per-group counts."""
        tensors = [self.perm, self.classes, self.counts, self.streams, self.offsets]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def col_groups(self) -> int:
        return int(self.counts.shape[1])

    def levels(self) -> Tensor:
        """(cols,) int64 level counts in the original column order (1 for omitted columns)."""
        out = torch.ones(self.cols, dtype=torch.int64)
        L = torch.repeat_interleave(self.classes[:, 1].long(), self.classes[:, 2].long())
        out[self.perm.long()] = L
        return out

    def unpack(self) -> Tensor:
        """(rows, cols) int64 codes in the original column order: the inverse of the build
        (0 in one-level columns), one vectorised unpack per part stream (torch, no numba)."""
        order = self.perm.long()
        C = torch.zeros(self.rows, order.numel(), dtype=torch.int64)
        widths = [width_of(L) for L in self.levels()[order].tolist()]
        for k, (p, (pos, offs)) in enumerate(zip(PART_WIDTHS, part_positions(widths))):
            if not pos:
                continue
            stream = self.streams[int(self.offsets[k]) : int(self.offsets[k + 1])]
            part = _unpack_stream(stream, p, self.rows * len(pos)).view(self.rows, len(pos))
            C[:, torch.tensor(pos)] |= part << torch.tensor(offs)
        out = torch.zeros(self.rows, self.cols, dtype=torch.int64)
        out[:, order] = C
        return out


def build_layout(
    codes: Tensor,
    levels: Tensor,
    group_size: int | None,
    sym: bool,
    dim: str = "oc",
    ngroups: int | None = None,
) -> KernelLayout:
    """Build the kernel layout of one layer from its codes.

    Args:
        codes: (rows, cols) integer codes, column ``j`` in ``[0, levels[j])`` (original order).
        levels: (cols,) level counts in ``[1, 256]``.
        group_size: columns (per IC: rows) per range group, or None.
        sym: symmetric grid.
        dim: "oc" or "ic".
        ngroups: range groups (default: from the shape and ``group_size``).
    Returns:
        The :class:`KernelLayout` (on the CPU).
    Raises:
        ValueError: a level count outside ``[1, 256]``.
    """
    codes = codes.detach().cpu()
    levels = levels.detach().cpu().to(torch.int64).reshape(-1)
    rows, cols = codes.shape
    if levels.numel() != cols:
        raise ValueError(f"levels has {levels.numel()} entries for {cols} columns")
    if int(levels.min()) < 1 or int(levels.max()) > MAX_LEVELS:
        raise ValueError(f"level counts must lie in [1, {MAX_LEVELS}] for the kernel layout")
    if dim not in ("oc", "ic"):
        raise ValueError(f"dim={dim!r}: use oc or ic")
    along = cols if dim == "oc" else rows
    if ngroups is None:
        ngroups = 1 if group_size is None else -(-along // group_size)
    index = torch.arange(cols)
    if dim == "oc" and group_size is not None:
        colgroup = index // group_size
        gc = ngroups
    else:
        colgroup = torch.zeros(cols, dtype=torch.int64)
        gc = 1
    keep = levels > 1
    # one stable sort on (group, level): the group dominates, levels are at most 256
    key = colgroup * (MAX_LEVELS + 1) + levels
    order = torch.argsort(key, stable=True)
    order = order[keep[order]]
    runs, counts_run = torch.unique_consecutive(key[order], return_counts=True)
    classes = (
        torch.stack([runs // (MAX_LEVELS + 1), runs % (MAX_LEVELS + 1), counts_run], dim=1)
        .to(torch.int32)
        .reshape(-1, 3)
    )
    perm_dtype = torch.int16 if cols <= 2**15 else torch.int32
    C = codes.index_select(1, order).to(torch.int32)  # (rows, m), kernel order
    widths = [width_of(L) for L in levels[order].tolist()]
    streams, counts = [], torch.zeros(4, gc, dtype=torch.int32)
    for k, (p, (pos, offs)) in enumerate(zip(PART_WIDTHS, part_positions(widths))):
        if pos:
            pos_t = torch.tensor(pos)
            part = (C[:, pos_t] >> torch.tensor(offs, dtype=torch.int32)) & ((1 << p) - 1)
            streams.append(_pack_stream(part, p))
            grp = colgroup[order[pos_t]]
            counts[k] = torch.bincount(grp, minlength=gc).to(torch.int32)
        else:
            streams.append(torch.zeros(0, dtype=torch.uint8))
    return KernelLayout(
        rows=rows,
        cols=cols,
        dim=dim,
        group_size=group_size,
        sym=sym,
        ngroups=ngroups,
        perm=order.to(perm_dtype),
        classes=classes,
        streams=torch.cat(streams),
        offsets=torch.tensor([0, *np.cumsum([t.numel() for t in streams]).tolist()]),
        counts=counts,
    )


def part_positions(widths: list[int]) -> list[tuple[list[int], list[int]]]:
    """Per part width (1, 2, 4, 8): the kernel-order columns that have that part, and the bit
    offset of the part in each one's code (:func:`parts_of`)."""
    out: list[tuple[list[int], list[int]]] = [([], []) for _ in PART_WIDTHS]
    for t, w in enumerate(widths):
        for q, off in parts_of(w):
            pos, offs = out[PART_WIDTHS.index(q)]
            pos.append(t)
            offs.append(off)
    return out


def _unpack_stream(stream: Tensor, p: int, n: int) -> Tensor:
    """The first ``n`` values of a strided part-``p`` stream (inverse of :func:`_pack_stream`)."""
    blocks = stream.view(-1, 1, LANES).to(torch.int64)
    shifts = (torch.arange(8 // p) * p).view(1, -1, 1)
    return ((blocks >> shifts) & ((1 << p) - 1)).reshape(-1)[:n]


def _pack_stream(part: Tensor, p: int) -> Tensor:
    """(rows, n) values below ``2^p`` -> the flat strided stream (module docstring)."""
    flat = part.reshape(-1).to(torch.int32)
    B = block_codes(p)
    nblk = -(-flat.numel() // B)
    padded = torch.zeros(nblk * B, dtype=torch.int32)
    padded[: flat.numel()] = flat
    slots = padded.view(nblk, 8 // p, LANES)  # code i * LANES + m of a block
    shifts = (torch.arange(8 // p, dtype=torch.int32) * p).view(1, -1, 1)
    return (slots << shifts).sum(dim=1).to(torch.uint8).reshape(-1)


def stream_bytes(rows: int, n: int, p: int) -> int:
    """Bytes of a part-``p`` stream of ``n`` codes per row."""
    return -(-rows * n // block_codes(p)) * LANES


def layout_nbytes(rows: int, levels: Tensor) -> int:
    """Code-stream bytes of the layout of a layer, from its level counts alone."""
    n = [0, 0, 0, 0]
    for L in levels.reshape(-1).tolist():
        for p, _ in parts_of(width_of(L)):
            n[PART_WIDTHS.index(p)] += 1
    return sum(stream_bytes(rows, c, p) for c, p in zip(n, PART_WIDTHS))

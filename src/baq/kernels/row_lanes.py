"""The row-lane runtime layout of a packed layer: each lane a row, codes as mixed-radix segments
(issue 26; the default layout of ``cache="kernel"``).

The lane layout (:mod:`baq.kernels.lanes`) puts 16 *columns* of one row in the 16 lanes of a
block, so every chunk of 16 columns takes its widest code's width, every column group ends in a
padded chunk, and a row's last block is part empty: on the reference model's 576- and
1536-column rows that held 0.27 to 0.37 bits a weight more than the best lane packing of the
same level counts, and the per-slot tables 0.10 more (session 20): 1.21 times the stored bytes.
Here the 16 lanes of a block are 16 *rows* and a lane word holds codes of one row, so the place
of a code is a property of its column alone, the same in every row:

* Slots. The columns with ``L > 1`` sorted by (column group, decreasing L, index): a class
  (group, L) is a run of slots, with no padding. One-level columns hold only 0 codes and drop
  out of the product.
* Segments. The slots of a class are cut into *segments* of ``d`` consecutive slots of one base
  ``B``: the segment's value is ``sum_i q_i B^i`` (digit ``i`` = slot ``first + i``), held in
  ``bits = ceil(log2 B^d)`` bits at bit ``shift`` of word ``word`` of every row's lane. ``B``
  is ``L`` (radix digits) with ``B^d <= 2^21``, so that the kernel peels the digits in float32
  exactly (the argument of :mod:`baq.kernels.lanes`: ``q_p = floor((f + 1/2) / B^p)`` is exact
  for ``f < 2^21``; digit ``p`` is ``q_p - B q_{p+1}``), or the power of two above ``L`` where
  that costs no more (:func:`segment_base`: 4, 8, 15 or 16 levels; bit fields, any number to a
  word, decoded by shifts). So a count costs about ``log2 L`` bits plus under one bit a segment:
  7 levels, 7 digits in 20 bits (2.86 bits a code against 3 for a field); 5 levels, 9 in 21
  (2.33 against 3).
* Words. A row is ``nwords`` uint32 words; segments of any classes and groups share a word
  (each has its own shift). Placement fills gaps: the classes, largest ``L`` first, put a
  segment of the most digits that fit in the best-fitting open gap, else as many digits as fit
  in the largest gap, else open a word; so the small counts fill what the large ones leave.
  Words are stored by block of 16 rows: ``words[block, word, lane]``, row ``16 block + lane``
  (rows past the layer's are zero codes).
* The kernel walks the segments in slot order (one column group's after another's; the classes
  by decreasing L, the order their words were filled in, so the walk mostly streams; within a
  class by decreasing digits, so runs of one digit count meet a loop unrolled for it): per
  segment one load of 16 lanes, a shift, a mask and a conversion, then ``d`` digits of three
  vector instructions each (a bit field: a shift, a mask, a conversion), every digit multiplied
  into the 16 rows' accumulator of each token by its scaled input ``xs[slot]`` (one broadcast).
  No horizontal sums: a block's 16 rows end in one vector per token.

Memory: ``ceil(rows / 16) * 16 * nwords * 4`` bytes of words; tables 8 bytes a segment, 2 a
column (4 past 32767 columns), 16 a class. On the rotated 3-bit reference model 3.21 bits a
weight of words and 0.04 of tables against the file's 3.00 (the lane layout: 3.55 and 0.10):
1.081 times the stored bytes with the ranges, against 1.210 (benchmarks/layout_bytes.py).

Per IC grids need each block's 16 rows in one row group (a group size that is a multiple of
16, or none): :func:`build_row_lanes` raises ``ValueError`` otherwise and the caller keeps the
lane layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from baq.kernels.layout import MAX_LEVELS

LANES = 16  # rows a block: one 512-bit vector of float32 (two 256-bit ones on AVX2)
WORD_BITS = 32
SEGMENT_BITS = 21  # a segment's value under 2^21: float32 peels its digits exactly
# bits a code a class may give up to be stored as bit fields rather than radix digits
# (segment_base). 0: only where fields cost nothing (a quarter of the reference model's codes);
# 0.15 would add 7 levels (46 %) for 0.06 bits a weight, and measured no faster (session 21)
FIELD_SLACK = 0.0
# rows packed or unpacked together: bounds the scratch to about 2^22 numbers a step
_SCRATCH = 2**22


@dataclass
class RowLaneLayout:
    """One layer's codes in row lanes (module docstring).

    Attributes:
        rows, cols: the weight's shape (out_features, in_features).
        dim, group_size, sym, ngroups: the grid's (quant/grid.py; ``ngroups`` range groups).
        words: (ceil(rows / 16), nwords, 16) int32 (uint32 bits), lane ``l`` of block ``b``
            being row ``16 b + l``.
        segs: (nseg, 4) int16 ``(word, base, shift, digits)`` in slot order: segment ``k``
            holds slots ``[first, first + digits)``, ``first`` the digits of the segments
            before it.
        gseg: (Gc + 1,) int32 first segment of each column group (``Gc``: groups per OC,
            else 1).
        slot_col: (nslots,) int16 (int32 past 32767 columns) original column of each slot.
        classes: (K, 4) int32 ``(column group, L, first slot, end slot)`` per class.
        gclass: (Gc + 1,) int32 first class of each column group.
    """

    rows: int
    cols: int
    dim: str
    group_size: int | None
    sym: bool
    ngroups: int
    words: Tensor
    segs: Tensor
    gseg: Tensor
    slot_col: Tensor
    classes: Tensor
    gclass: Tensor

    def tensors(self) -> list[Tensor]:
        """The tensors the kernel reads, in the order of lanes.cpp's ``struct RowLayout``."""
        return [self.words, self.segs, self.gseg, self.slot_col, self.classes, self.gclass]

    def nbytes(self) -> int:
        """Bytes held: words and tables."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def col_groups(self) -> int:
        return int(self.gseg.numel()) - 1

    def levels(self) -> Tensor:
        """(cols,) int64 level counts in the original column order (1 for omitted columns)."""
        out = torch.ones(self.cols, dtype=torch.int64)
        for _, L, s0, s1 in self.classes.tolist():
            out[self.slot_col[s0:s1].long()] = L
        return out

    def unpack(self) -> Tensor:
        """(rows, cols) int64 codes in the original column order: the inverse of the build (0
        in one-level columns)."""
        out = torch.zeros(self.rows, self.cols, dtype=torch.int64)
        word, shift, mask, div, base = _slot_fields(self.segs.long())
        cols = self.slot_col.long()
        nwords = self.words.shape[1]
        flat = self.words.permute(0, 2, 1).reshape(-1, nwords)  # (blocks * 16, nwords)
        step = max(1, _SCRATCH // max(1, cols.numel()))
        for r0 in range(0, self.rows, step):
            r1 = min(r0 + step, self.rows)
            lanes = flat[r0:r1].long() & 0xFFFFFFFF
            out[r0:r1, cols] = ((lanes[:, word] >> shift) & mask) // div % base
        return out


def segment_bits(base: int, digits: int) -> int:
    """Bits of a segment of ``digits`` base-``base`` digits: values below ``base^digits``."""
    return (base**digits - 1).bit_length()


def is_field_base(base: int) -> bool:
    """A power of two: the kernel decodes its digits as bit fields (shift, mask, conversion; no
    float32 peeling), so its segments may fill a whole word."""
    return base & (base - 1) == 0


def most_digits(base: int, room: int) -> int:
    """The most base-``base`` digits a segment holds in ``room`` bits (under 2^21 unless the
    digits are bit fields)."""
    cap = 1 << min(room, WORD_BITS if is_field_base(base) else SEGMENT_BITS)
    d, p = 0, base
    while p <= cap:
        d, p = d + 1, p * base
    return d


def segment_base(levels: int, slack: float | None = None) -> int:
    """The base a class of ``levels`` levels is stored in: ``levels`` itself (radix digits,
    peeled in float32), or the power of two above it where its bit fields cost at most
    ``slack`` (default :data:`FIELD_SLACK`) bits a code more than its longest radix segment
    (4, 8, 15, 16 levels at no cost; 7 levels: 3 bits against 20 / 7 = 2.86). Bit fields fill
    a whole word and decode by a shift, a mask and a conversion a code."""
    slack = FIELD_SLACK if slack is None else slack
    width = (levels - 1).bit_length()
    full = most_digits(levels, SEGMENT_BITS)
    radix = segment_bits(levels, full) / full  # a segment of the most digits, in its bits
    return 1 << width if width - radix <= slack else levels


def plan_segments(
    classes: list[tuple[int, int, int, int]], slack: float | None = None
) -> tuple[list[list[int]], int]:
    """Segments ``[word, base, shift, digits]`` in slot order for ``classes`` (``(group, L,
    first slot, end slot)``, slots consecutive), and the words a row takes (module docstring:
    largest counts first, best fit of a whole segment, else the largest gap filled). Within a
    class the segments are in order of decreasing digits, so the kernel meets runs of one digit
    count (a loop unrolled for it) rather than a new count every few segments."""
    gaps: list[list[int]] = [[] for _ in range(WORD_BITS + 1)]  # gaps[g]: words with g bits free
    nwords = 0
    placed: list[tuple[int, list[list[int]]]] = []  # (first slot of the class, its segments)
    for _, levels, s0, s1 in sorted(classes, key=lambda c: (-c[1], c[2])):
        base = segment_base(levels, slack)
        one = segment_bits(base, 1)
        full = most_digits(base, WORD_BITS)
        segs, s = [], s0
        while s < s1:
            want = segment_bits(base, min(full, s1 - s))
            g = next((g for g in range(want, WORD_BITS + 1) if gaps[g]), None)
            if g is None:
                g = next((g for g in range(WORD_BITS, one - 1, -1) if gaps[g]), None)
            if g is None:
                word, g = nwords, WORD_BITS
                nwords += 1
            else:
                word = gaps[g].pop()
            d = min(most_digits(base, g), s1 - s)
            bits = segment_bits(base, d)
            segs.append([word, base, WORD_BITS - g, d])
            if g > bits:
                gaps[g - bits].append(word)
            s += d
        # the slots of a class are alike: any segment may hold any of them
        placed.append((s0, sorted(segs, key=lambda seg: -seg[3])))
    placed.sort(key=lambda p: p[0])
    return [seg for _, segs in placed for seg in segs], nwords


def _slot_fields(segs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per slot ``(word, shift, mask, divisor, base)``: its code is ``((lane >> shift) & mask)
    // divisor % base`` (``divisor = B^i``, digit ``i`` of its segment)."""
    if segs.numel() == 0:
        z = torch.zeros(0, dtype=torch.int64)
        return z, z, z, z, z
    word, base, shift, digits = segs.unbind(1)
    first = torch.cumsum(digits, 0) - digits
    seg_of = torch.repeat_interleave(torch.arange(segs.shape[0]), digits)
    i = torch.arange(seg_of.numel()) - first[seg_of]
    b = base[seg_of]
    mask = (1 << torch.tensor([segment_bits(B, d) for B, d in zip(
        base.tolist(), digits.tolist(), strict=True)], dtype=torch.int64)) - 1  # fmt: skip
    return word[seg_of], shift[seg_of], mask[seg_of], b**i, b


def build_row_lanes(
    codes: Tensor,
    levels: Tensor,
    group_size: int | None,
    sym: bool,
    dim: str = "oc",
    ngroups: int | None = None,
) -> RowLaneLayout:
    """Build the row-lane layout of one layer from its codes.

    Args:
        codes: (rows, cols) integer codes, column ``j`` in ``[0, levels[j])`` (original order).
        levels: (cols,) level counts in ``[1, 256]``.
        group_size: columns (per IC: rows) per range group, or None.
        sym: symmetric grid.
        dim: "oc" or "ic".
        ngroups: range groups (default: from the shape and ``group_size``).
    Returns:
        The :class:`RowLaneLayout` (on the CPU).
    Raises:
        ValueError: a level count outside ``[1, 256]``, a bad shape or ``dim``, per IC groups
            whose size is not a multiple of 16, or more words a row than the tables index.
    """
    codes = codes.detach().cpu()
    levels = levels.detach().cpu().to(torch.int64).reshape(-1)
    rows, cols = codes.shape
    if levels.numel() != cols:
        raise ValueError(f"levels has {levels.numel()} entries for {cols} columns")
    if int(levels.min()) < 1 or int(levels.max()) > MAX_LEVELS:
        raise ValueError(f"level counts must lie in [1, {MAX_LEVELS}] for the row-lane layout")
    if dim not in ("oc", "ic"):
        raise ValueError(f"dim={dim!r}: use oc or ic")
    if dim == "ic" and group_size is not None and group_size % LANES:
        raise ValueError(f"per IC groups of {group_size} rows split the 16-row blocks")
    along = cols if dim == "oc" else rows
    if ngroups is None:
        ngroups = 1 if group_size is None else -(-along // group_size)
    per_oc_groups = dim == "oc" and group_size is not None
    colgroup = torch.arange(cols) // group_size if per_oc_groups else torch.zeros(cols).long()
    gc = ngroups if per_oc_groups else 1
    # classes in order of decreasing L (the order segments are placed in words): the walk meets
    # the large classes' words one after another and the gap fills last
    key = colgroup * (MAX_LEVELS + 1) + (MAX_LEVELS - levels)
    order = torch.argsort(key, stable=True)
    order = order[levels[order] > 1]
    runs_key, run_len = torch.unique_consecutive(key[order], return_counts=True)
    start = torch.cumsum(run_len, 0) - run_len
    classes = torch.stack(
        [
            runs_key // (MAX_LEVELS + 1),
            MAX_LEVELS - runs_key % (MAX_LEVELS + 1),
            start,
            start + run_len,
        ],
        1,
    ).reshape(-1, 4)
    gclass = torch.cat([torch.zeros(1).long(), torch.cumsum(torch.bincount(
        classes[:, 0], minlength=gc), 0)])  # fmt: skip
    seg_list, nwords = plan_segments([tuple(c) for c in classes.tolist()])
    if nwords > torch.iinfo(torch.int16).max:
        raise ValueError(f"{nwords} words a row: the row-lane tables index at most 32767")
    segs = torch.tensor(seg_list, dtype=torch.int64).reshape(-1, 4)
    # a group's segments are consecutive (its slots are): the first of each by its first slot
    seg_first = torch.cumsum(segs[:, 3], 0) - segs[:, 3]
    gslot = torch.cat([classes[:, 2], torch.tensor([order.numel()])])[gclass]
    gseg = torch.searchsorted(seg_first.contiguous(), gslot.contiguous())
    words = _pack_words(codes, order, segs, nwords)
    index = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
    return RowLaneLayout(
        rows=rows,
        cols=cols,
        dim=dim,
        group_size=group_size,
        sym=sym,
        ngroups=ngroups,
        words=words,
        segs=segs.to(torch.int16),
        gseg=gseg.to(torch.int32),
        slot_col=order.to(index),
        classes=classes.to(torch.int32),
        gclass=gclass.to(torch.int32),
    )


def _pack_words(codes: Tensor, slot_col: Tensor, segs: Tensor, nwords: int) -> Tensor:
    """(ceil(rows / 16), nwords, 16) int32: every slot's code times its factor, summed into its
    word (segments never overlap: adding is or-ing)."""
    rows = codes.shape[0]
    blocks = -(-rows // LANES)
    word, shift, _, div, _ = _slot_fields(segs)
    mult = div << shift
    out = torch.zeros(blocks * LANES, nwords, dtype=torch.int64)
    step = max(1, _SCRATCH // max(1, slot_col.numel()))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        out[r0:r1].index_add_(1, word, codes[r0:r1, slot_col].to(torch.int64) * mult)
    out = (out - ((out >> 31) << 32)).to(torch.int32)  # [0, 2^32) as int32 of the same bits
    return out.view(blocks, LANES, nwords).transpose(1, 2).contiguous()


def row_lanes_nbytes(rows: int, levels: Tensor, group_size: int | None = None) -> int:
    """Word bytes of a per-OC layer from its level counts alone (the tables left out): the
    segments' places depend on the level counts only."""
    fake = build_row_lanes(torch.zeros(1, levels.numel(), dtype=torch.long), levels, group_size,
                           False)  # fmt: skip
    return 4 * LANES * -(-rows // LANES) * int(fake.words.shape[1])


__all__ = ["RowLaneLayout", "build_row_lanes", "plan_segments", "row_lanes_nbytes"]

"""The lane-field runtime layout of a packed layer, for the native kernel (issue 26).

Built at load time from the saved codes (the file is unchanged; :meth:`LaneLayout.unpack` gives
the codes back exactly, so the saved streams can be rebuilt byte for byte). The EXL2 idea of
issue 26, columns of equal width together with the input permuted to match:

* Order. The columns with ``L > 1`` sorted by (column group, L, index), as
  :mod:`baq.kernels.layout`: a class (group, L) is a run, so is a width ``ceil(log2 L)``. One-level
  columns hold only 0 codes and drop out of the product (their "bias" term is 0).
* Slots and chunks. The sorted columns of a column group fill *slots* from a chunk boundary on, a
  chunk being :data:`CHUNK` (16) slots, the last one of a group padded with empty slots (input 0).
  Per OC groups need this (each group's partial sum is scaled by its own range); without groups
  there is one group and one padded chunk. A chunk's width is its widest code's (widths ascend
  within a group, so the last column's).
* Lane fields. A row is a sequence of *blocks* of 16 uint32 lanes (one 512-bit vector). Chunk
  ``k`` of width ``w`` is a ``w``-bit field at bit ``shift[k]`` of every lane of block
  ``block[k]``: slot ``l`` of the chunk in lane ``l``. The chunks fill the blocks in order, a new
  block starting when the next field does not fit in the 32 bits (3-bit chunks: 10 a block, 30 of
  32 bits used). Decoding a chunk is one vector load, one variable shift and, for ``w <= 4``, one
  ``vpermps`` from a 16-entry table ``i & (2^w - 1)`` (the bits above the field are ignored by
  the table: no mask, no conversion), else a mask and a conversion: 16 codes as float32 in 2 or 3
  instructions for any width, then one FMA per token. The same per-chunk tables (block, shift)
  serve every row: a row is ``rowwords`` uint32 (and its share of the tail blocks, below) and
  rows are independent (threads split them).
* Radix blocks. A level count just above a power of two wastes most of a bit at its ceiling
  width (3 levels in 2 bits, 5 or 6 in 3, 9 to 11 in 4, 17 or 18 in 5, 33 to 38 in 6). A run of
  chunks whose widest column has such a count ``B`` (:func:`radix_digits`) is stored in base
  ``B`` instead where that is smaller: each lane of a block holds a 21-bit word of ``d_lo``
  base-``B`` digits and an 11-bit word of ``d_hi`` (``B^d`` fits the word), digit ``p`` of a
  block being chunk ``first + p`` (``chunk_shift`` is then the digit, not a bit). 21 bits so
  that the kernel peels digits in float32 exactly: ``q = floor((f + 1/2) / B)`` is off from the
  true quotient's fraction (``(r + 1/2) / B``, at least ``1 / (2B)`` from an integer) by at most
  ``1 / (4B)`` for ``f < 2^21`` (the reciprocal's and the product's roundings, each under
  ``2^-24`` relative of a value under ``2^21 / B``), then the digit is ``f - qB`` exactly: three
  vector instructions a digit. 3 levels: 19 codes a lane against 16; 5 and 6: 13 and 12 against
  10; 9 to 11: 9 against 8.
* Runs: consecutive chunks of one width and one base in one group, ``(first chunk, end chunk,
  width, base)`` with base 0 for bit fields; the kernel switches on them once a run. The radix
  runs' blocks follow all the bit fields' in a row, so no block is left part empty.
* Shared tails. A row's last bit-field block is part empty: at 576 or 1536 columns a 3-bit row
  needs about 3.4 blocks, and a whole fourth one made the held bytes 1.19 times the saved ones
  (1.29 with free level counts). Its fields (the tail chunks: the bit-field chunks from
  ``tail_chunk`` on) go instead into one or two *tail parts*: a part of ``b <= 16`` bits a lane
  is shared by ``P = 32 // b`` rows, row ``r``'s at bit ``(r % P) * b`` of the lanes of block
  ``r // P`` of the part, so a row holds ``1 / P`` of a block for it. Two parts, because one
  alone is shared only where the block is at most half full: 18 bits (six 3-bit chunks) are 15
  bits shared by 2 rows and 3 shared by 10, 0.6 of a block. The build picks the split (or one
  part, or none: the block stays the row's) that holds least a row
  (:func:`~baq.kernels.lane_tails.tail_parts`). The row's own blocks keep one stride,
  ``rowwords``, so the kernel's rows read together stay ``rowwords`` apart and its whole-block
  loop is unchanged; only the tail chunks, read through the tables anyway, take a block and a
  shift per row and part. The radix blocks are whole
  and stay the row's.

Memory: ``rows * rowwords * 4`` bytes and the tail blocks, ``ceil(rows / P) * 64`` a part: each
code at its chunk's width, plus the bits a block leaves unused (2 of 32 for 3, 5 and 6 bits, 4
for 7; a tail part, ``32 - P b`` of ``P`` rows) and the padding of each group's last chunk.
Tables: 8 bytes a column (original index, ``L - 1``), 8 a chunk, 16 a run, 16 a class, 12 a
tail part. benchmarks/layout_bytes.py reports the bytes against the saved ones (on the s17
folders 1.09 with power-of-two level counts, 1.21 with free ones, 1.17 compact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from baq.kernels.lane_tails import LANE_BITS
from baq.kernels.lane_tails import tail_parts as _tail_parts
from baq.kernels.layout import MAX_LEVELS, width_of

CHUNK = 16  # slots a chunk: one 512-bit vector of float32, a field in each of 16 lanes
# a radix lane: a low word of RADIX_LO_BITS (float32 peels its digits exactly, module docstring)
# and a high word of the rest
RADIX_LO_BITS = 21
RADIX_HI_BITS = LANE_BITS - RADIX_LO_BITS
# rows packed or unpacked together: bounds the scratch to about 2^22 numbers a step
_SCRATCH = 2**22


@dataclass
class LaneLayout:
    """One layer's codes as lane fields (module docstring).

    Attributes:
        rows, cols: the weight's shape (out_features, in_features).
        dim, group_size, sym, ngroups: the grid's (quant/grid.py; ``ngroups`` range groups).
        words: (rows, rowwords) int32, each row's own blocks of 16 lanes (uint32 bits).
        tail: (ntail, 16) int32, the shared tail blocks of all parts ((0, 16) without a tail).
        tail_chunk: the first tail chunk: the bit-field chunks from it on (not the radix ones)
            are in the row's tail, no more in ``words`` (the chunk count without a tail).
        tail_parts: (nparts, 3) int32 ``(rows a block P, bits b, first block)`` of each part of
            the tail (0 to 2 parts): row ``r``'s part is the ``b`` bits at bit ``(r % P) * b``
            of the lanes of tail block ``first + r // P``, ``P = 32 // b``.
        chunk_word: (nchunks,) int32 first word of each chunk's block in a row (a tail chunk:
            ``16 * part``, as if a row's parts followed its words).
        chunk_shift: (nchunks,) int32 bit of each chunk's field in its lanes (in a radix run:
            its digit in the block; a tail chunk: its bit in its part's ``b``).
        runs: (nruns, 4) int32 ``(first chunk, end chunk, width, base)``, base 0 for bit
            fields.
        grun: (Gc + 1,) int32 first run of each column group (``Gc``: groups per OC, else 1).
        slot_col: (nslots,) int32 original column of each slot, -1 for padding.
        slot_lm1: (nslots,) float32 ``L - 1`` of each slot (1 for padding).
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
    tail: Tensor
    tail_chunk: int
    tail_parts: Tensor
    chunk_word: Tensor
    chunk_shift: Tensor
    runs: Tensor
    grun: Tensor
    slot_col: Tensor
    slot_lm1: Tensor
    classes: Tensor
    gclass: Tensor

    def tensors(self) -> list[Tensor]:
        """The tensors the kernel reads: ``words``, ``tail``, ``tail_parts``, then the tables in
        the order of lanes.cpp's ``struct Layout`` (which holds the two tail pointers last)."""
        return [self.words, self.tail, self.tail_parts, self.chunk_word, self.chunk_shift,
                self.runs, self.grun, self.slot_col, self.slot_lm1, self.classes,
                self.gclass]  # fmt: skip

    def nbytes(self) -> int:
        """Bytes held: words, tail blocks and tables."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def col_groups(self) -> int:
        return int(self.grun.numel()) - 1

    def chunk_widths(self) -> Tensor:
        """(nchunks,) int64 width of every chunk."""
        r = self.runs.long()
        return torch.repeat_interleave(r[:, 2], r[:, 1] - r[:, 0])

    def tail_chunks(self) -> Tensor:
        """(nchunks,) bool: whether each chunk's field is in the row's tail."""
        return _tail_mask(self.runs.long(), self.tail_chunk)

    def row_tails(self, r0: int, r1: int) -> Tensor:
        """(r1 - r0, 16 * nparts) int64 the tail parts of rows ``[r0, r1)``, each at bit 0 of
        its 16 lanes."""
        r = torch.arange(r0, r1)
        out = []
        for P, b, first in self.tail_parts.tolist():
            lanes = self.tail[first + r // P].long() & 0xFFFFFFFF
            out.append((lanes >> ((r % P) * b).view(-1, 1)) & ((1 << b) - 1))
        return torch.cat(out, 1) if out else torch.zeros(r.numel(), 0, dtype=torch.int64)

    def levels(self) -> Tensor:
        """(cols,) int64 level counts in the original column order (1 for omitted columns)."""
        out = torch.ones(self.cols, dtype=torch.int64)
        real = self.slot_col >= 0
        out[self.slot_col[real].long()] = self.slot_lm1[real].long() + 1
        return out

    def unpack(self) -> Tensor:
        """(rows, cols) int64 codes in the original column order: the inverse of the build (0
        in one-level columns)."""
        out = torch.zeros(self.rows, self.cols, dtype=torch.int64)
        real = self.slot_col >= 0
        cols = self.slot_col[real].long()
        # a row's words followed by its tail parts: a tail chunk reads rowwords + 16 part + lane
        rowwords = self.words.shape[1]
        start = self.chunk_word.long() + self.tail_chunks() * rowwords
        lanes = start.view(-1, 1) + torch.arange(CHUNK)  # (nchunks, 16)
        shift, mask, div, base = (t.view(-1, 1) for t in _field_readers(
            self.runs.long(), self.chunk_shift.long()))  # fmt: skip
        step = max(1, _SCRATCH // max(1, lanes.numel()))
        for r0 in range(0, self.rows, step):
            r1 = min(r0 + step, self.rows)
            w = torch.cat([self.words[r0:r1].long() & 0xFFFFFFFF, self.row_tails(r0, r1)], 1)
            codes = ((w[:, lanes] >> shift) & mask) // div % base  # (rb, nchunks, 16)
            out[r0 : r0 + step, cols] = codes.reshape(w.shape[0], -1)[:, real]
        return out


def radix_digits(base: int) -> tuple[int, int]:
    """Base-``base`` digits in the low (21-bit) and the high (11-bit) word of a radix lane."""

    def fit(bits: int) -> int:
        d, p = 0, base
        while p <= 1 << bits:
            d, p = d + 1, p * base
        return d

    return fit(RADIX_LO_BITS), fit(RADIX_HI_BITS)


def radix_pays(base: int) -> bool:
    """Whether a lane holds more base-``base`` digits than ``ceil(log2 base)``-bit fields."""
    return base > 2 and sum(radix_digits(base)) > LANE_BITS // width_of(base)


def _field_readers(runs: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per chunk ``(shift, mask, divisor, base)``: its code is ``((lane >> shift) & mask) //
    divisor % base`` (bit fields: divisor 1, base past any code)."""
    n = runs[:, 1] - runs[:, 0]
    width = torch.repeat_interleave(runs[:, 2], n)
    base = torch.repeat_interleave(runs[:, 3], n)
    out_shift, mask = shift.clone(), (1 << width) - 1
    div, mod = torch.ones_like(shift), torch.full_like(shift, 1 << 32)
    for b in base.unique().tolist():
        if b == 0:
            continue
        sel = base == b
        d_lo = radix_digits(b)[0]
        p = shift[sel]
        hi = p >= d_lo
        out_shift[sel] = torch.where(hi, RADIX_LO_BITS, 0)
        mask[sel] = torch.where(hi, (1 << RADIX_HI_BITS) - 1, (1 << RADIX_LO_BITS) - 1)
        div[sel] = torch.tensor(b, dtype=torch.int64) ** torch.where(hi, p - d_lo, p)
        mod[sel] = b
    return out_shift, mask, div, mod


def _fields(runs: Tensor, tails: bool = True) -> tuple[Tensor, Tensor, int, int, list[int]]:
    """Block and bit (radix: digit) of every chunk's field; returns the first word of each
    chunk's block (a tail chunk: ``16 * part``), its shift, the words of a row, the first tail
    chunk and the bits of each tail part (:class:`LaneLayout`). The bit-field chunks fill
    blocks in chunk order, skipping the radix runs (a run only reads its own chunks' blocks and
    shifts), and the radix runs take whole blocks after them: no block is left part empty
    between the two. The last bit-field block becomes the shared tail where that takes less
    memory (:func:`~baq.kernels.lane_tails.tail_parts`) and ``tails``; else it stays the row's,
    as every block."""
    n = int(runs[-1, 1]) if runs.numel() else 0
    word, shift = [0] * n, [0] * n
    block, bit = -1, LANE_BITS  # no block open yet
    for k0, k1, w, base in runs.tolist():
        if base:
            continue
        for k in range(k0, k1):
            if bit + w > LANE_BITS:
                block, bit = block + 1, 0
            word[k], shift[k] = block * CHUNK, bit
            bit += w
    # the last block's chunks: a suffix of the bit-field chunks (radix chunks may sit between)
    last = [k for k0, k1, _, base in runs.tolist() if not base for k in range(k0, k1)
            if word[k] == block * CHUNK]  # fmt: skip
    part = _tail_parts([int(runs[_run_of(runs, k), 2]) for k in last]) if tails else []
    tail_chunk, bits = n, []
    if part:
        tail_chunk, bits = last[0], [0] * (max(part) + 1)
        for k, p in zip(last, part):
            width = int(runs[_run_of(runs, k), 2])
            word[k], shift[k] = p * CHUNK, bits[p]
            bits[p] += width
        block -= 1
    for k0, k1, _, base in runs.tolist():
        if not base:
            continue
        d = sum(radix_digits(base))
        for i in range(k1 - k0):
            if i % d == 0:
                block += 1
            word[k0 + i], shift[k0 + i] = block * CHUNK, i % d
    return (
        torch.tensor(word, dtype=torch.int64),
        torch.tensor(shift, dtype=torch.int64),
        (block + 1) * CHUNK,
        tail_chunk,
        bits,
    )


def _tail_mask(runs: Tensor, tail_chunk: int) -> Tensor:
    """(nchunks,) bool: the bit-field chunks from ``tail_chunk`` on (radix chunks never are
    tail chunks)."""
    base = torch.repeat_interleave(runs[:, 3], runs[:, 1] - runs[:, 0])
    return (torch.arange(base.numel()) >= tail_chunk) & (base == 0)


def _run_of(runs: Tensor, k: int) -> int:
    """The run holding chunk ``k``."""
    return int(torch.searchsorted(runs[:, 1].contiguous(), k, right=True))


def build_lanes(
    codes: Tensor,
    levels: Tensor,
    group_size: int | None,
    sym: bool,
    dim: str = "oc",
    ngroups: int | None = None,
    radix: bool = False,
    tails: bool = True,
) -> LaneLayout:
    """Build the lane-field layout of one layer from its codes.

    Args:
        codes: (rows, cols) integer codes, column ``j`` in ``[0, levels[j])`` (original order).
        levels: (cols,) level counts in ``[1, 256]``.
        group_size: columns (per IC: rows) per range group, or None.
        sym: symmetric grid.
        dim: "oc" or "ic".
        ngroups: range groups (default: from the shape and ``group_size``).
        radix: store the level counts of :func:`radix_pays` as radix digits (the ``"compact"``
            cache: smaller, slower to decode); False, the default: bit fields only.
        tails: share the rows' last bit-field blocks where that holds less (module docstring);
            False: each row keeps its own, the layout before shared tails (the same codes in
            the same chunks, so the kernel gives the same bits: tests, benchmarks/kernel_ab.py).
    Returns:
        The :class:`LaneLayout` (on the CPU).
    Raises:
        ValueError: a level count outside ``[1, 256]``, or a bad shape or ``dim``.
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
    per_oc_groups = dim == "oc" and group_size is not None
    colgroup = torch.arange(cols) // group_size if per_oc_groups else torch.zeros(cols).long()
    gc = ngroups if per_oc_groups else 1
    key = colgroup * (MAX_LEVELS + 1) + levels
    order = torch.argsort(key, stable=True)
    order = order[levels[order] > 1]
    # slots: every group from a chunk boundary on, its last chunk padded
    per_group = torch.bincount(colgroup[order], minlength=gc)
    chunks = -(-per_group // CHUNK)
    gslot = torch.cumsum(chunks * CHUNK, 0) - chunks * CHUNK  # first slot of each group
    gfirst = torch.cumsum(per_group, 0) - per_group  # first sorted column of each group
    g_of = colgroup[order]
    slot_of = gslot[g_of] + torch.arange(order.numel()) - gfirst[g_of]
    nslots = int(chunks.sum()) * CHUNK
    slot_col = torch.full((nslots,), -1, dtype=torch.int64)
    slot_col[slot_of] = order
    slot_L = torch.ones(nslots, dtype=torch.int64)
    slot_L[slot_of] = levels[order]
    slot_w = torch.tensor([width_of(L) for L in slot_L.tolist()], dtype=torch.int64)
    widths = slot_w.view(-1, CHUNK).amax(dim=1) if nslots else slot_w
    chunk_group = torch.repeat_interleave(torch.arange(gc), chunks)
    chunk_L = slot_L.view(-1, CHUNK).amax(dim=1) if nslots else slot_L
    bases = _radix_bases(chunk_L, chunk_group) if radix else torch.zeros_like(chunk_L)
    runs, grun = _runs(widths, bases, chunk_group, gc)
    runs_key, run_len = torch.unique_consecutive(key[order], return_counts=True)
    cstart = slot_of[torch.cumsum(run_len, 0) - run_len]
    classes = torch.stack(
        [runs_key // (MAX_LEVELS + 1), runs_key % (MAX_LEVELS + 1), cstart, cstart + run_len], 1
    ).reshape(-1, 4)
    gclass = torch.cat([torch.zeros(1).long(), torch.cumsum(torch.bincount(
        classes[:, 0], minlength=gc), 0)])  # fmt: skip
    chunk_word, chunk_shift, rowwords, tail_chunk, bits = _fields(runs, tails)
    shared = torch.tensor([LANE_BITS // b for b in bits], dtype=torch.int64)
    blocks = -(-rows // shared)
    tail_parts = torch.stack([shared, torch.tensor(bits, dtype=torch.int64),
                              torch.cumsum(blocks, 0) - blocks], 1).reshape(-1, 3)  # fmt: skip
    is_tail = _tail_mask(runs, tail_chunk)
    words, tail = _pack_words(
        codes, slot_col, chunk_word + is_tail * rowwords, _multipliers(runs, chunk_shift),
        rowwords, tail_parts,
    )  # fmt: skip
    return LaneLayout(
        rows=rows,
        cols=cols,
        dim=dim,
        group_size=group_size,
        sym=sym,
        ngroups=ngroups,
        words=words,
        tail=tail,
        tail_chunk=tail_chunk,
        tail_parts=tail_parts.to(torch.int32),
        chunk_word=chunk_word.to(torch.int32),
        chunk_shift=chunk_shift.to(torch.int32),
        runs=runs.to(torch.int32),
        grun=grun.to(torch.int32),
        slot_col=slot_col.to(torch.int32),
        slot_lm1=(slot_L - 1).clamp(min=1).to(torch.float32),
        classes=classes.to(torch.int32),
        gclass=gclass.to(torch.int32),
    )


def _radix_bases(chunk_levels: Tensor, chunk_group: Tensor) -> Tensor:
    """(nchunks,) base of every chunk: its widest level count ``B`` where radix blocks hold
    more of them than bit fields (:func:`radix_pays`), else 0. Of ``n`` chunks sharing ``B``
    (and a group), the whole blocks' are digits, and the ``r < digits`` left over too if their
    fields would take more than the block (``r * width > 32``); else they stay bit fields,
    which share blocks with their neighbours."""
    n = chunk_levels.numel()
    bases = torch.zeros(n, dtype=torch.int64)
    if n == 0:
        return bases
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = (chunk_levels[1:] != chunk_levels[:-1]) | (chunk_group[1:] != chunk_group[:-1])
    first = torch.nonzero(change).reshape(-1).tolist()
    for a, b in zip(first, first[1:] + [n]):
        base = int(chunk_levels[a])
        if radix_pays(base):
            d = sum(radix_digits(base))
            whole = (b - a) // d * d
            if (b - a - whole) * width_of(base) > LANE_BITS:
                whole = b - a
            bases[a : a + whole] = base
    return bases


def _runs(widths: Tensor, bases: Tensor, chunk_group: Tensor, gc: int) -> tuple[Tensor, Tensor]:
    """Runs of chunks of one width, base and group: (nruns, 4) and the first run of every
    group."""
    n = widths.numel()
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.int64), torch.zeros(gc + 1, dtype=torch.int64)
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = ((widths[1:] != widths[:-1]) | (bases[1:] != bases[:-1])
                  | (chunk_group[1:] != chunk_group[:-1]))  # fmt: skip
    first = torch.nonzero(change).reshape(-1)
    end = torch.cat([first[1:], torch.tensor([n])])
    runs = torch.stack([first, end, widths[first], bases[first]], 1)
    per_group = torch.bincount(chunk_group[first], minlength=gc)
    grun = torch.cat([torch.zeros(1).long(), torch.cumsum(per_group, 0)])
    return runs, grun


def _multipliers(runs: Tensor, shift: Tensor) -> Tensor:
    """(nchunks,) the factor of each chunk's code in its lane: ``2^shift`` for a bit field,
    ``B^p`` (low word) or ``B^p 2^21`` (high word) for digit ``p`` of a radix block."""
    shift_bits, _, div, _ = _field_readers(runs, shift)
    return div << shift_bits


def _pack_words(
    codes: Tensor, slot_col: Tensor, word: Tensor, factor: Tensor, rowwords: int, parts: Tensor
) -> tuple[Tensor, Tensor]:
    """The codes in their lane fields: (rows, rowwords) int32 words (uint32 bits) and the
    (ntail, 16) int32 shared tail blocks of the ``parts`` (``LaneLayout.tail_parts``).
    ``word``: each chunk's first word in a row followed by its tail parts (a tail chunk's at
    ``rowwords + 16 * part``)."""
    rows = codes.shape[0]
    out = torch.zeros(rows, rowwords + CHUNK * parts.shape[0], dtype=torch.int64)
    src = slot_col.clamp(min=0)
    pad = slot_col < 0
    lanes = (word.view(-1, 1) + torch.arange(CHUNK)).reshape(-1)  # word of each slot
    factors = factor.repeat_interleave(CHUNK)
    step = max(1, _SCRATCH // max(1, slot_col.numel()))
    for r0 in range(0, rows, step):
        C = codes[r0 : r0 + step, src].to(torch.int64)
        C[:, pad] = 0
        # fields (digits) of one word never overlap: adding is or-ing
        out[r0 : r0 + step].index_add_(1, lanes, C * factors)
    tail = [torch.zeros(0, CHUNK, dtype=torch.int64)]
    for p, (P, b, _) in enumerate(parts.tolist()):
        # row j of a group of P at bit j * b; a last group short of rows: zeros
        groups = -(-rows // P)
        own = torch.zeros(groups * P, CHUNK, dtype=torch.int64)
        own[:rows] = out[:, rowwords + p * CHUNK : rowwords + (p + 1) * CHUNK]
        at = (torch.arange(P) * b).view(1, -1, 1)
        tail.append((own.view(groups, P, CHUNK) << at).sum(1))
    return _as_int32(out[:, :rowwords]), _as_int32(torch.cat(tail))


def _as_int32(v: Tensor) -> Tensor:
    """int64 values in [0, 2^32) as int32 of the same bits."""
    return (v - ((v >> 31) << 32)).to(torch.int32)


def lanes_nbytes(
    rows: int, levels: Tensor, group_size: int | None = None, radix: bool = False
) -> int:
    """Word and tail bytes of a per-OC layer from its level counts alone (the tables left
    out): the fields' places depend on the level counts only, so one row tells all."""
    zeros = torch.zeros(1, levels.numel(), dtype=torch.long)
    fake = build_lanes(zeros, levels, group_size, False, radix=radix)
    tails = sum(-(-rows // P) for P in fake.tail_parts[:, 0].tolist())
    return 4 * (rows * fake.words.shape[1] + tails * CHUNK)

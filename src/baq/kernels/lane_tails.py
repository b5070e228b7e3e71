"""Which fields of a row's last, part-filled bit-field block go to the shared tail parts of the
lane layout (:mod:`baq.kernels.lanes`, module docstring; issue 26): a subset sum over the
fields' widths, the split that holds least a row. Apart from lanes.py, which it keeps under the
project's 500 lines a module."""

from __future__ import annotations

LANE_BITS = 32  # bits of a lane of the layout's 16-lane blocks


def tail_parts(widths: list[int]) -> list[int]:
    """The part (0 or 1) of each field of a row's last block, or [] to keep the block the
    row's own. A part of ``b <= 16`` bits is shared by ``32 // b`` rows, so a row holds
    ``1 / (32 // b)`` of a block for it; the fields are split in the two parts (or left in one)
    that hold the least, if that is under a whole block. Two parts because one alone is shared
    only where the block is at most half full: a 3-bit row of 576 columns ends in 6 chunks, 18
    bits, which stay a whole block alone but are 15 + 3 bits in parts shared by 2 and 10 rows
    (0.6 of a block). Among equal costs the fewer parts (the fewer loads), then part 0 wider."""
    total = sum(widths)
    if total == 0:
        return []

    def cost(b: int) -> float:
        return 0.0 if b == 0 else 1.0 / (LANE_BITS // b)

    # subsets of the fields by their sum: the first found of each sum, a bit mask of fields
    reach = {0: 0}
    for i, w in enumerate(widths):
        for a, m in list(reach.items()):
            reach.setdefault(a + w, m | 1 << i)
    best, pick = 1.0, None
    for a, m in sorted(reach.items(), reverse=True):
        b = total - a
        if a > LANE_BITS // 2 or b > a:
            continue  # part 0 the wider; a part over 16 bits is a whole block
        c = cost(a) + cost(b)
        if c < best - 1e-12:
            best, pick = c, m
    if pick is None:
        return []
    return [0 if pick >> i & 1 else 1 for i in range(len(widths))]

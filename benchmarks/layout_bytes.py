"""Resident bytes of the kernel layout of every layer of a saved folder (issue 26).

For each packed linear of a saved folder: its stored bytes (codes, ranges, tables: what the file
holds for it), the bytes of the native kernel's row-lane layout (the ``"kernel"`` cache, the
default, baq/kernels/row_lanes.py), its lane layout with bit fields only (``"lanes"``) and with
radix runs (``"compact"``, baq/kernels/lanes.py), and
the ratios of what the layer then holds (the layout and its other buffers: ranges, level table,
order; the kernel widens float16 ranges at each call) to the stored bytes; then the sums over the
model. No timing: the layouts are built from the saved codes as a load does.

    python benchmarks/layout_bytes.py SAVED_FOLDER [--json out.json] [--top 10] \
        [--sample-shapes 4096x14336 14336x4096]

``--bounds``: what any 32-bit lane layout could hold the same codes in, bits a weight over the
model (codes only, no ranges or tables), to tell the layout's own waste from what the level
counts cost in lanes: the file (log2 L a code, what the saved streams hold), fields of the
ceiling width packed without gaps, each count at its best of a bit field and the compact
layout's radix lane (``32 / digits``), and a mixed-radix lane per row (the columns of a row,
any bases mixed, packed first-fit decreasing into lanes of a 21-bit and an 11-bit word, the
words whose digits float32 peels exactly; lanes.py): what a layout with rows in the lanes and
no padding would hold with that packing (on the rotated 3-bit reference model it loses to one
base a lane: 3.28 against 3.17 bits, session 20).

``--sample-shapes``: also layers of those shapes whose columns' level counts are drawn from the
folder's histogram (weighted by weights), to see the layout of a larger model at the same
allocation (per-OC float16 ranges and an int16 order counted on both sides).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from baq.kernels.lanes import RADIX_HI_BITS, RADIX_LO_BITS, build_lanes, lanes_nbytes, radix_digits
from baq.kernels.row_lanes import build_row_lanes, row_lanes_nbytes
from baq.saved.packed_linear import PackedLinear
from baq.saved.packing import packed_nbytes, unpack_sorted

CACHES = ("kernel", "lanes", "compact")


def layer_row(name: str, m: PackedLinear) -> dict:
    packed = m.packed
    codes = packed.unsort(unpack_sorted(packed)).cpu()
    levels = packed.levels().cpu()
    out = {"name": name, "shape": [m.out_features, m.in_features], "stored": m.storage_nbytes}
    for key, radix in (("lanes", False), ("compact", True)):
        lanes = build_lanes(codes, levels, m.group_size, m.sym, m.dim, radix=radix)
        assert torch.equal(lanes.unpack(), codes * (levels > 1)), name
        out[key] = lanes.nbytes()
    try:
        rows = build_row_lanes(codes, levels, m.group_size, m.sym, m.dim)
        assert torch.equal(rows.unpack(), codes * (levels > 1)), name
        out["kernel"] = rows.nbytes()
    except ValueError:  # per IC groups that split a 16-row block: the lane layout
        out["kernel"] = out["lanes"]
    out["buffers"] = sum(b.numel() * b.element_size() for n, b in m.named_buffers()
                         if not n.startswith("codes_"))  # fmt: skip
    for key in CACHES:
        out[f"{key}_over_stored"] = (out[key] + out["buffers"]) / out["stored"]
    return out


def sampled_rows(histogram: dict[int, int], shapes: list[str], seed: int = 0) -> list[dict]:
    """Layers of ``shapes`` ("ROWSxCOLS") with column level counts drawn from ``histogram``
    (level count -> weights): stored bytes (codes, float16 per-OC ranges, int16 order) against
    the kernel and compact layouts plus the same ranges and order."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(list(histogram))
    p = torch.tensor(list(histogram.values()), dtype=torch.float64)
    out = []
    for shape in shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        levels = counts[torch.multinomial(p / p.sum(), cols, replacement=True, generator=gen)]
        other = rows * 2 * 2 + cols * 2  # float16 lo/hi per row, int16 column order
        stored = other + sum(packed_nbytes(int(L), int((levels == L).sum()) * rows)
                             for L in levels.unique())  # fmt: skip
        row = {"name": "sampled", "shape": [rows, cols], "stored": stored, "buffers": other}
        one = build_row_lanes(torch.zeros(1, cols, dtype=torch.int64), levels, None, False)
        row["kernel"] = one.nbytes() - one.words.numel() * 4 + row_lanes_nbytes(rows, levels)
        row["kernel_over_stored"] = (row["kernel"] + other) / stored
        for key, radix in (("lanes", False), ("compact", True)):
            # one row built: its tables are the layer's; the words and the tail blocks shared
            # by rows (lanes.py) counted for ``rows``
            one = build_lanes(torch.zeros(1, cols, dtype=torch.int64), levels, None, False,
                              radix=radix)  # fmt: skip
            tables = one.nbytes() - 4 * (one.words.numel() + one.tail.numel())
            row[key] = tables + lanes_nbytes(rows, levels, radix=radix)
            row[f"{key}_over_stored"] = (row[key] + other) / stored
        out.append(row)
    return out


def mixed_radix_lanes(levels: list[int]) -> int:
    """32-bit lanes that hold one digit of each count of ``levels`` (> 1), any bases mixed in a
    word: first-fit decreasing into a 21-bit and an 11-bit word a lane (a word holds digits of
    bases whose product is at most 2^bits)."""
    lanes: list[list[int]] = []  # the products of each lane's low and high word
    for base in sorted(levels, reverse=True):
        for lane in lanes:
            if lane[0] * base <= 1 << RADIX_LO_BITS:
                lane[0] *= base
                break
            if lane[1] * base <= 1 << RADIX_HI_BITS:
                lane[1] *= base
                break
        else:
            lanes.append([base, 1])
    return len(lanes)


def packing_bounds(model) -> dict[str, float]:
    """Bits a weight of the codes of every packed linear under the packings of ``--bounds``."""
    bits = {"file": 0.0, "ceiling fields": 0.0, "best field or radix": 0.0, "mixed radix": 0.0}
    weights = 0
    for m in model.modules():
        if not isinstance(m, PackedLinear):
            continue
        weights += m.out_features * m.in_features
        levels = [L for L, n in m.level_classes.tolist() for _ in range(n) if L > 1]
        ceil = [math.ceil(math.log2(L)) for L in levels]
        best = [min(w, 32 / sum(radix_digits(L))) for L, w in zip(levels, ceil, strict=True)]
        row = {
            "file": sum(math.log2(L) for L in levels),
            "ceiling fields": sum(ceil),
            "best field or radix": sum(best),
            "mixed radix": 32 * mixed_radix_lanes(levels),
        }
        for k, v in row.items():
            bits[k] += v * m.out_features
    return {k: v / weights for k, v in bits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--top", type=int, default=8, help="layers printed (the largest)")
    ap.add_argument("--sample-shapes", nargs="*", default=[], metavar="ROWSxCOLS")
    ap.add_argument("--bounds", action="store_true", help="codes' bits under other packings")
    args = ap.parse_args()
    for shape in args.sample_shapes:
        if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", shape):
            ap.error(f"--sample-shapes {shape}: use ROWSxCOLS, e.g. 4096x14336")
    import baq
    from baq.atomic import UnsafeOutput, check_output_file, write_json
    from baq.errors import one_line
    from baq.saved.headers import StorageError

    try:  # the output path before the load, a bad folder in one line
        if args.json:
            check_output_file(args.json, "--json")
        model, _ = baq.load(args.folder, cache="codes")
    except (StorageError, UnsafeOutput, OSError) as err:
        print(f"layout_bytes: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    rows = [layer_row(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    total = {k: sum(r[k] for r in rows) for k in ("stored", *CACHES, "buffers")}
    extra = total["buffers"]
    total.update({f"{k}_over_stored": (total[k] + extra) / total["stored"] for k in CACHES})
    total.update(name="all", shape=["", ""])
    print("| layer | shape | stored B | kernel layout B | lanes layout B | compact layout B |"
          " other buffers B | held / stored, kernel | lanes | compact |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    largest = sorted(rows, key=lambda r: -r["stored"])[: args.top]
    histogram: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            for L, n in m.level_classes.tolist():
                histogram[L] = histogram.get(L, 0) + n * m.out_features
    sampled = sampled_rows(histogram, args.sample_shapes)
    for r in largest + [total] + sampled:
        print(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['stored']} | {r['kernel']} |"
              f" {r['lanes']} |"
              f" {r['compact']} | {r['buffers']} | {r['kernel_over_stored']:.3f} |"
              f" {r['lanes_over_stored']:.3f} | {r['compact_over_stored']:.3f} |")  # fmt: skip
    bounds = packing_bounds(model) if args.bounds else {}
    if bounds:
        print("\n| codes held as | bits a weight | over the file |\n|---|---:|---:|")
        for k, v in bounds.items():
            print(f"| {k} | {v:.3f} | {v / bounds['file']:.3f} |")
    if args.json:
        report = {"folder": str(args.folder), "layers": rows, "total": total, "sampled": sampled,
                  "bounds": bounds}  # fmt: skip
        write_json(args.json, report, indent=1)


if __name__ == "__main__":
    main()

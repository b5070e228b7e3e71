"""Interleaved timing of the native kernel against float32 and bfloat16 ``F.linear`` (issue 26).

On a machine shared with other jobs, the load drifts between the timings of
benchmarks/kernel_speed.py (each method timed in a run of its own). Here every repeat calls each
method once, in turn, so all of them see the same load; medians of wall and CPU time
(``time.process_time``, all threads) over the repeats. One layer, real level histograms.

    python benchmarks/kernel_ab.py --shape 4096x14336 --bits 3 --tokens 1 16 --threads 1 2

``--baseline-source OLD.cpp`` also builds another version of lanes.cpp (say, ``git show
HEAD~1:src/baq/kernels/lanes.cpp > OLD.cpp``) and times it in the same turns, and checks that
both versions give the same bits: a kernel change A/B in one process (``--other-order``: a
change of the summation order, checked to float32 rounding instead). The baseline runs on the
layout built with ``tails=False`` (each row's part-empty last block its own, as before shared
tails, baq/kernels/lanes.py): lanes.cpp's ``struct Layout`` holds the tails last, so an older
kernel reads its prefix, and the codes sit in the same chunks, summed in the same order, so the
bits must agree. ``--compact`` instead
times the same kernel on the compact layout (``build_lanes(radix=True)``, the ``"compact"``
cache) as the "baseline" column, and checks the two agree to float32 rounding; ``--rows`` the
same with the row-lane layout (baq/kernels/row_lanes.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_speed import sample_levels

from baq.kernels import native
from baq.kernels.lanes import build_lanes
from baq.kernels.row_lanes import build_row_lanes
from baq.quant.grid import fit_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x14336")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--baseline-source", type=Path, help="another lanes.cpp to time beside")
    ap.add_argument(
        "--other-order",
        action="store_true",
        help="the baseline sums in another order: agree to float32 rounding, not bit for bit",
    )
    ap.add_argument(
        "--compact",
        action="store_true",
        help="baseline column: this kernel on the compact (radix) layout",
    )
    ap.add_argument(
        "--rows", action="store_true", help="baseline column: the row-lane layout's kernel"
    )
    args = ap.parse_args()
    new_lib = native.library()
    old_lib = None
    if args.baseline_source is not None:
        source, native.SOURCE = native.SOURCE, args.baseline_source.absolute()
        try:
            old_lib = native._compile(False)
        finally:
            native.SOURCE = source

    def with_lib(lib, layout):
        def call(x):
            native._LIBS[False] = lib
            try:
                return native.linear(layout, x, lo, hi)
            finally:
                native._LIBS[False] = new_lib

        return call

    rows, cols = map(int, args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    levels = sample_levels(cols, args.bits, False, gen)
    W = torch.randn(rows, cols, generator=gen)
    grid = fit_grid(W, group_size=None, sym=False)
    codes = (torch.rand(rows, cols, generator=gen) * levels).long()
    layout = build_lanes(codes, levels, None, False)
    own = build_lanes(codes, levels, None, False, tails=False) if old_lib is not None else None
    fields = build_lanes(codes, levels, None, False, radix=True) if args.compact else None
    if args.rows:
        fields = build_row_lanes(codes, levels, None, False)
    Wb = W.bfloat16()
    lo, hi = grid.lo.half().float(), grid.hi.half().float()
    print(
        f"{args.shape}, {args.bits} bits: layout {layout.nbytes() / 1e6:.1f} MB"
        + (f" (baseline: {fields.nbytes() / 1e6:.1f} MB)" if fields is not None else "")
        + (f" (without shared tails: {own.nbytes() / 1e6:.1f} MB)" if own is not None else "")
    )
    has_base = old_lib is not None or fields is not None
    base = " baseline us | baseline / native |" if has_base else ""
    print(
        "| threads | tokens | fp32 us | bf16 us | native us | fp32 / native | same, CPU time |"
        + base
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if has_base else ""))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for T in args.tokens:
            x = torch.randn(T, cols)
            xb = x.bfloat16()
            fns = {
                "fp32": lambda x=x: F.linear(x, W),
                "bf16": lambda xb=xb: F.linear(xb, Wb),
                "native": lambda x=x: native.linear(layout, x, lo, hi),
            }
            if old_lib is not None:
                fns["baseline"] = lambda x=x: with_lib(old_lib, own)(x)
                a, b = fns["native"](), fns["baseline"]()
                if args.other_order:
                    tol = 1e-5 * F.linear(x.abs(), W.abs()).max()
                    assert float((a - b).abs().max()) <= tol, "the baseline source disagrees"
                else:
                    assert torch.equal(a, b), "the baseline source gives other bits than lanes.cpp"
            if fields is not None:
                fns["baseline"] = lambda x=x: native.linear(fields, x, lo, hi)
                a, b = fns["native"](), fns["baseline"]()
                tol = 1e-5 * F.linear(x.abs(), W.abs()).max()
                assert float((a - b).abs().max()) <= tol, "the two layouts disagree"
            wall = {k: [] for k in fns}
            cpu = {k: [] for k in fns}
            for fn in fns.values():
                fn()
            for _ in range(args.repeat):
                for k, fn in fns.items():
                    t, c = time.perf_counter(), time.process_time()
                    fn()
                    wall[k].append(time.perf_counter() - t)
                    cpu[k].append(time.process_time() - c)
            w = {k: statistics.median(v) for k, v in wall.items()}
            c = {k: statistics.median(v) for k, v in cpu.items()}
            print(
                f"| {threads} | {T} | {w['fp32'] * 1e6:.0f} | {w['bf16'] * 1e6:.0f} | "
                f"{w['native'] * 1e6:.0f} | {w['fp32'] / w['native']:.2f} | "
                f"{c['fp32'] / c['native']:.2f} |"
                + (
                    f" {w['baseline'] * 1e6:.0f} | {w['baseline'] / w['native']:.2f} |"
                    if has_base
                    else ""
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Seconds per block by stage, peak RSS and the memory plan of one ``baq`` command (issue 28).

Runs a ``baq`` command line in this process with timers wrapped around the functions each stage
calls, and prints a table: for each walk (``measure``, ``quantize``) and block, the exclusive
wall seconds of

* ``load``: opening and closing the block (a ``--lazy`` run reads it from disk here),
* ``hessians``: the block forward with the Hessian hooks (``BlockStep.hessians``),
* ``forward``: the block forwards that give the next block's inputs,
* ``factor``: dampening and Cholesky factors of each Hessian (``quant.gptq.factor_hessian``),
* ``solve``: GPTQ's column-by-column rounding (``quant.gptq.gptq_solve``),
* ``layer``: the rest of ``quantize_layer`` (sensitivities, allocation, clipping search),
* ``measure``: the measurement pass's own sensitivities (``run.measure._sensitivities``),
* ``pack``: packing codes (``saved.packing.pack_columns``),

plus what happens outside any block (capture of block 0's inputs, the allocation, the save) and
the process's peak RSS (VmHWM) against the memory plan's ``estimated_peak_gib`` from the run's
``--report``. Exclusive: a stage's time excludes the timed stages it calls, so the columns add
up to the wall time. Nothing in ``baq`` is changed; the timers replace module attributes for
the life of this process only.

    python benchmarks/stage_times.py --json out.json -- quantize /tmp/llama-7b-shape --lazy \\
        --bits 3 --eval none --output /tmp/q7b --report /tmp/q7b.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import baq.cli
import baq.quant.gptq
import baq.run.measure
import baq.run.streaming
import baq.run.walker
import baq.saved.packing

TIMES: dict[tuple[str, int, str], float] = defaultdict(float)
CPU: dict[tuple[str, int, str], float] = defaultdict(float)
STATE = {"walk": "setup", "block": -1}
# child (wall, CPU) seconds accumulated by the enclosing timed call
STACK: list[list[float]] = []


def timed(stage: str, fn):
    def wrapper(*args, **kwargs):
        STACK.append([0.0, 0.0])
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent, cpu = time.perf_counter() - t0, time.process_time() - c0
            child_wall, child_cpu = STACK.pop()
            key = (STATE["walk"], STATE["block"], stage)
            TIMES[key] += spent - child_wall
            CPU[key] += cpu - child_cpu
            if STACK:
                STACK[-1][0] += spent
                STACK[-1][1] += cpu

    wrapper.__wrapped__ = fn
    return wrapper


def patch_everywhere(original, replacement) -> None:
    """Replace ``original`` wherever a loaded baq module bound it (``from x import f`` copies)."""
    for name, mod in list(sys.modules.items()):
        if not name.startswith("baq") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, attr, replacement)


def install() -> None:
    walker, streaming = baq.run.walker, baq.run.streaming

    init = walker.BlockWalk.__init__

    def walk_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        STATE["walk"], STATE["block"] = self.stage, -1

    walker.BlockWalk.__init__ = walk_init

    open_block = streaming.open_block

    def open_timed(model, i, *args, **kwargs):
        STATE["block"] = i
        return timed("load", open_block)(model, i, *args, **kwargs)

    patch_everywhere(open_block, open_timed)
    patch_everywhere(streaming.close_block, timed("load", streaming.close_block))
    patch_everywhere(streaming.capture_inputs, timed("capture", streaming.capture_inputs))
    walker.BlockStep.hessians = timed("hessians", walker.BlockStep.hessians)
    patch_everywhere(walker.forward_all, timed("forward", walker.forward_all))
    gptq = baq.quant.gptq
    patch_everywhere(gptq.factor_hessian, timed("factor", gptq.factor_hessian))
    patch_everywhere(gptq.gptq_solve, timed("solve", gptq.gptq_solve))
    import baq.quant.layer as layer

    patch_everywhere(layer.quantize_layer, timed("layer", layer.quantize_layer))
    meas = baq.run.measure
    if hasattr(meas, "_sensitivities"):
        meas._sensitivities = timed("measure", meas._sensitivities)
    packing = baq.saved.packing
    patch_everywhere(packing.pack_columns, timed("pack", packing.pack_columns))


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


STAGES = ("load", "capture", "hessians", "forward", "measure", "factor", "solve", "layer", "pack")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="also write the table here")
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="-- then a baq command line")
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    install()
    t0 = time.perf_counter()
    try:
        rc = baq.cli.main(argv)
    except Exception as err:  # the stages timed before a failure are still worth the table
        print(f"the command failed: {type(err).__name__}: {err}", file=sys.stderr)
        rc = 1
    wall = time.perf_counter() - t0
    cpu_all = time.process_time()
    rows, cpu_rows = defaultdict(dict), defaultdict(dict)
    for (walk, block, stage), s in TIMES.items():
        rows[(walk, block)][stage] = s
        cpu_rows[(walk, block)][stage] = CPU[(walk, block, stage)]
    timed_total = sum(TIMES.values())
    # CPU seconds (all threads) beside wall: on a shared machine waiting for a core inflates the
    # wall time, not the CPU time
    for title, table in (("wall s", rows), ("CPU s, all threads", cpu_rows)):
        print(f"\n{title}\n\n| walk | block | {' | '.join(STAGES)} | total |")
        print("|---|---:|" + "---:|" * (len(STAGES) + 1))
        for (walk, block), cols in sorted(table.items()):
            cells = " | ".join(f"{cols.get(s, 0.0):.1f}" for s in STAGES)
            print(f"| {walk} | {block} | {cells} | {sum(cols.values()):.1f} |")
    print(
        f"\nwall {wall:.1f} s (CPU {cpu_all:.1f} s), in timed stages {timed_total:.1f} s, rc {rc}"
    )
    report_path = argv[argv.index("--report") + 1] if "--report" in argv else None
    estimate = None
    if report_path and Path(report_path).exists():
        estimate = json.loads(Path(report_path).read_text()).get("memory", {})
    print(f"peak RSS {peak_rss_gib():.2f} GiB; memory plan {estimate}")
    if args.json:
        out = {
            "argv": argv,
            "wall_s": wall,
            "peak_rss_gib": peak_rss_gib(),
            "memory": estimate,
            "cpu_s": cpu_all,
            "stages": [{"walk": w, "block": b, **cols} for (w, b), cols in sorted(rows.items())],
            "cpu_stages": [
                {"walk": w, "block": b, **cols} for (w, b), cols in sorted(cpu_rows.items())
            ],
        }
        args.json.write_text(json.dumps(out, indent=1))
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())

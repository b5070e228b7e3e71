"""``baq bench``: the method x bits grid of the standard protocol, each run cached."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import GRID_DIMS, RANGE_DTYPES
from .common import UsageError, add_model_args, check_model, check_source, flagify
from .measure import add_adadim_arg, add_clip_arg, add_rotate_arg


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    b = sub.add_parser(
        "bench",
        parents=[common],
        help="run the method x bits grid of the standard protocol, caching each run",
    )
    add_model_args(b)
    b.set_defaults(dtype="float32", func=cmd_bench)  # the protocol evaluates in fp32
    g = b.add_argument_group("grid")
    g.add_argument(
        "--methods",
        nargs="+",
        metavar="M",
        help="any of fp rtn gptq baq-measured baq-analytic baq-int baq-model baq-model-int "
        "baq-model-noise (baq-model*: one budget for the model), in run order (default all)",
    )
    g.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], help="budgets of every method")
    g.add_argument(
        "--baq-bits",
        nargs="*",
        type=float,
        default=[2.5],
        help="extra (fractional) budgets of baq-measured and baq-model",
    )
    g.add_argument("--group-size", type=int, help="also run every method with groups of N columns")
    g.add_argument("--act-order", action="store_true", help="also run GPTQ and BAQ in act order")
    g.add_argument(
        "--dim",
        nargs="+",
        default=["oc"],
        choices=GRID_DIMS,
        help="grid dimensions to run every variant on (oc: per row, ic: per column, auto: AdaDim)",
    )
    g.add_argument("--percdamp", type=float, default=0.01, help="dampening, fraction of mean H_jj")
    add_adadim_arg(g)
    add_clip_arg(g, bench=True)
    add_rotate_arg(g, bench=True)
    g.add_argument(
        "--include-head",
        action="store_true",
        help="also quantize the output head in every quantized run (its own cache keys)",
    )
    g.add_argument(
        "--range-dtype",
        default="float16",
        choices=RANGE_DTYPES,
        help="grid ranges; float32 reproduces the published code's grids",
    )
    d = b.add_argument_group("data")
    d.add_argument(
        "--text",
        metavar="SRC",
        help="calibration text and first evaluation set (default: "
        "../shared/data/wikitext2-test.txt if it exists, else builtin)",
    )
    d.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="SRC",
        help="another evaluation set (cached runs are re-quantized and evaluated on it only)",
    )
    d.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    d.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    d.add_argument("--seed", type=int, default=0, help="seed of the window positions")
    d.add_argument(
        "--calib-start",
        type=int,
        help="first token calibration windows may start at (default 150000, or the token after "
        "the evaluation windows if the text is shorter)",
    )
    d.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")
    d.add_argument("--eval-windows", type=int, default=32, help="first N windows of each set")
    o = b.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("bench-out"), help="cache and results folder")
    o.add_argument("--only", nargs="+", metavar="NAME", help="run only these (fnmatch patterns)")
    o.add_argument("--list", action="store_true", help="show the grid, cached or missing")
    o.add_argument("--plots-only", action="store_true", help="table and plots from the cache")


def cmd_bench(args: argparse.Namespace) -> int:
    from baq.bench import grid as bench_grid
    from baq.bench import runner
    from baq.model import loader

    for src, flag in [(args.text, "--text"), *((e, "--eval") for e in args.eval)]:
        if src is not None:
            check_source(src, flag)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a file; give a folder")
    try:
        grid = bench_grid.build_grid(
            args.methods or tuple(bench_grid.FAMILIES),
            args.bits,
            args.baq_bits,
            args.group_size,
            args.act_order,
            args.percdamp,
            args.range_dtype,
            tuple(dict.fromkeys(args.dim)),
            args.include_head,
            args.adadim,
            args.clip,
            args.rotate,
        )
        settings = bench_grid.BenchSettings(
            model=args.model,
            gguf_file=args.gguf_file,
            dtype=args.dtype,
            device=args.device,
            text=args.text or bench_grid.default_text(),
            evals=tuple(args.eval),
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            calib_start=args.calib_start,
            eval_seqlen=args.eval_seqlen,
            eval_windows=args.eval_windows,
        )
    except ValueError as err:
        raise UsageError(flagify(str(err))) from None
    entries = bench_grid.cache_entries(settings, grid, args.out)
    selected = bench_grid.select(entries, args.only)
    if args.list:
        print(runner.format_plan(selected))
        return 0
    if not args.plots_only:
        if any(bench_grid.missing_sets(e, bench_grid.load_result(e)) for e in selected):
            loader.resolve_device(args.device)
            check_model(args, args.seqlen, args.eval_seqlen)
        echo = None if args.quiet else lambda line: print(line, flush=True)
        runner.run_bench(settings, grid, args.out, args.only, echo=echo)
    else:
        runner.write_outputs(args.out, entries)
    if not args.quiet:
        done = sum(e.path.is_file() for e in entries)
        print(f"{done} of {len(entries)} runs cached; table and plots in {args.out}")
    return 0

"""``baq quantize``: load, calibrate, quantize layer by layer, evaluate, report, save."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..config import (
    ALLOCATIONS,
    GRID_DIMS,
    IMPORTANCES,
    METHODS,
    RANGE_DTYPES,
    SENSITIVITIES,
    QuantConfig,
)
from .calibration import add_calib_args, calib_config, calib_windows
from .common import (
    UsageError,
    add_eval_args,
    add_model_args,
    check_calib_fits,
    check_eval_fits,
    check_lazy,
    check_model,
    check_output_folder,
    check_report_file,
    check_source,
    eval_sets,
    eval_sources,
    flagify,
    load,
    load_lazy,
    positive,
    refuse_saved_model,
)
from .export import add_shard_arg, check_shard_size
from .measure import (
    add_adadim_arg,
    add_clip_arg,
    add_head_arg,
    add_measure_samples_arg,
    add_rotate_arg,
    check_measurement_args,
    measure_samples_of,
    rotation_of,
)
from .memory import plan_run_memory


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    q = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a model and report perplexity before and after",
    )
    add_model_args(q)
    g = q.add_argument_group("quantization")
    g.add_argument("--method", default="baq", choices=METHODS)
    g.add_argument("--bits", type=float, default=3.0, help="target average bits per weight")
    g.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="columns per range (default: one range per row); when N does not divide the "
        "columns, the last group is shorter",
    )
    g.add_argument("--sym", action="store_true", help="symmetric grid")
    g.add_argument(
        "--dim",
        default="oc",
        choices=GRID_DIMS,
        help="grid ranges per row (oc, default), per input column (ic; --group-size then counts "
        "rows), or per layer the one with the smaller RTN output error (auto: AdaDim)",
    )
    add_adadim_arg(g)
    add_clip_arg(g)
    add_rotate_arg(g)
    g.add_argument("--act-order", action="store_true", help="solve columns by decreasing diag H")
    g.add_argument("--percdamp", type=float, default=0.01, help="dampening, fraction of mean H_jj")
    g.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-batch block")
    g.add_argument("--integer-bits", action="store_true", help="BAQ: power-of-two levels only")
    g.add_argument(
        "--sensitivity",
        default=None,
        choices=SENSITIVITIES,
        help="BAQ's c_j: measured (a uniform solve; default with --allocation layer) or "
        "analytic (default with --allocation model)",
    )
    add_allocation_args(g)
    g.add_argument("--exponent", type=float, default=2.0, help="BAQ: t in B + log2(c/g)/t")
    g.add_argument("--max-levels", type=int, default=256, help="BAQ: cap on levels per column")
    g.add_argument(
        "--min-levels",
        type=int,
        default=None,
        help="BAQ: floor on levels per column (default: 2 when rotated, the default; 1 with "
        "--no-rotate: prunable)",
    )
    g.add_argument("--hessian-dtype", default="float32", choices=["float32", "float64"])
    g.add_argument(
        "--range-dtype",
        default="float16",
        choices=RANGE_DTYPES,
        help="grid ranges: float16 (stored as such) or float32 (the published code's grids; "
        "+0.05 bits stored)",
    )
    g.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave linears matching this fnmatch pattern unquantized (repeatable)",
    )
    add_head_arg(g)
    add_calib_args(q)
    # 16 windows: perplexity before and after in about a minute each on two CPU cores
    add_eval_args(q, default=["builtin"], windows=16)
    m = q.add_argument_group("memory")
    m.add_argument(
        "--lazy",
        action="store_true",
        help="read one decoder block at a time from a local safetensors folder: host memory "
        "stays about one block plus the calibration activations, however deep the model",
    )
    m.add_argument(
        "--max-activation-memory",
        metavar="SIZE",
        default=None,
        help="RAM for each of a block's calibration input and output sets (e.g. 2GiB, 500MB); "
        "beyond it they spill to a temporary file in $TMPDIR (default: no limit)",
    )
    o = q.add_argument_group("output")
    o.add_argument("--skip-before", action="store_true", help="no perplexity before quantizing")
    o.add_argument("--report", type=Path, help="write the JSON run report here")
    o.add_argument("--output", type=Path, help="save the packed quantized model in this folder")
    o.add_argument("--force", action="store_true", help="replace an existing --output folder")
    add_shard_arg(o)
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from the checkpoint in OUTPUT.partial",
    )

    q.set_defaults(func=cmd_quantize)


def add_allocation_args(g: Any) -> None:
    """BAQ's allocation scope and, for the model-level allocation, its importance estimator."""
    g.add_argument(
        "--allocation",
        default=None,
        choices=ALLOCATIONS,
        help="BAQ: one budget for the whole model, layers priced by their measured importance "
        "(model, the default: it wins at every budget measured, docs/RESULTS.md) or every "
        "layer gets --bits (layer, the paper's)",
    )
    g.add_argument(
        "--importance",
        default="fisher",
        choices=IMPORTANCES,
        help="model allocation: importance estimator, fisher (one backward per window) or "
        "noise (one partial forward per layer)",
    )
    g.add_argument(
        "--importance-samples",
        type=int,
        default=QuantConfig.importance_samples,
        metavar="N",
        help="calibration windows the importance estimator reads (noise: at most 2)",
    )
    add_measure_samples_arg(g)
    g.add_argument(
        "--measurement",
        type=Path,
        metavar="FILE",
        help="model allocation: reuse this baq measure file instead of measuring first",
    )


def quant_config(args: argparse.Namespace) -> QuantConfig:
    # the model-level allocation is BAQ's; RTN and GPTQ give every weight --bits
    allocation = args.allocation or ("model" if args.method == "baq" else "layer")
    try:
        return QuantConfig(
            method=args.method,
            bits=args.bits,
            group_size=args.group_size,
            sym=args.sym,
            dim=args.dim,
            adadim=args.adadim,
            clip=args.clip,
            **rotation_of(args),
            act_order=args.act_order,
            percdamp=args.percdamp,
            block_size=args.block_size,
            integer_bits=args.integer_bits,
            sensitivity=args.sensitivity or ("analytic" if allocation == "model" else "measured"),
            exponent=args.exponent,
            max_levels=args.max_levels,
            min_levels=args.min_levels,
            hessian_dtype=args.hessian_dtype,
            range_dtype=args.range_dtype,
            skip=tuple(args.skip),
            allocation=allocation,
            importance=args.importance,
            importance_samples=args.importance_samples,
            measure_samples=measure_samples_of(args),
            include_head=args.include_head,
        )
    except ValueError as err:
        raise UsageError(flagify(str(err))) from None


def validate_quantize(args: argparse.Namespace) -> tuple[QuantConfig, Any, Any]:
    """Every check that needs no weights; the run's settings, frozen.

    Returns:
        ``(cfg, calib_config, session)``: the :class:`~baq.run.session.Session` holds the
        output, the measurement given, the activation budget and the memory plan.
    """
    from baq.run.activations import parse_size
    from baq.run.session import Session

    cfg = quant_config(args)
    measurement = check_measurement_args(args, cfg)
    try:
        max_activation_bytes = parse_size(args.max_activation_memory)
    except ValueError as err:
        raise UsageError(f"--max-activation-memory: {err}") from None
    positive("eval-windows", args.eval_windows)
    if args.eval_seqlen < 2:
        raise UsageError(f"--eval-seqlen={args.eval_seqlen}: use at least 2")
    for src in eval_sources(args):
        check_source(src, "--eval")
    calib = calib_config(args)
    max_shard_size = check_shard_size(args)
    if args.output is not None:
        check_output_folder(args.output, args.force)
    if args.report is not None:
        check_report_file(args.report)
    refuse_saved_model(args.model)  # a baq save is already quantized
    check_lazy(args)  # before check_model: a hub id or GGUF is refused without reading it
    config = check_model(args, args.seqlen, *([args.eval_seqlen] if eval_sources(args) else []))
    check_calib_fits(args, calib)
    check_eval_fits(args)
    # the plan may spill the activations to disk, or refuse the run in one line
    memory = plan_run_memory(args, cfg, config, max_activation_bytes)
    if memory is not None:
        max_activation_bytes = memory.max_activation_bytes
    session = Session(
        cfg=cfg,
        device=args.device,
        output=args.output,
        force=args.force,
        max_shard_size=max_shard_size,
        resume=args.resume,
        measurement=measurement,
        max_activation_bytes=max_activation_bytes,
        evaluate_before=not args.skip_before,
        report_path=args.report,
        model_name=args.model or "reference:SmolLM2-135M-Instruct.Q4_1",
        memory_plan=None if memory is None else memory.as_dict(),
    )
    return cfg, calib, session


def cmd_quantize(args: argparse.Namespace) -> int:
    """Check, load, then the whole run of :func:`baq.run.session.run_session`; print its summary."""
    from baq.run import report
    from baq.run.session import run_session

    cfg, calib_cfg, session = validate_quantize(args)
    check_resume(args, cfg)
    t = time.perf_counter()
    loader = None
    if args.lazy:
        model, tok, loader = load_lazy(args)
    else:
        model, tok = load(args)
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    calib = calib_windows(tok, calib_cfg)
    sets = eval_sets(args, tok)
    prepared = time.perf_counter() - t
    seconds = {"load": loaded, "data": prepared}
    rep = run_session(model, tok, calib, session, sets, calib_cfg, loader, seconds=seconds).report
    if not args.quiet:
        print(report.format_summary(rep))
        if session.output is not None:
            print(
                f"saved {session.output}  ({rep['storage_bits']:.3f} storage bits per quantized "
                f"weight; {rep['folder_bytes']:,} bytes, {rep['folder_bits_per_parameter']:.3f} "
                "bits per parameter of the whole model)"
            )
    return 0


def check_resume(args: argparse.Namespace, cfg: QuantConfig) -> None:
    """``--resume`` needs ``--output`` and its checkpoint, with the same settings; a leftover
    checkpoint needs ``--resume``."""
    from dataclasses import asdict

    from baq.run import checkpoint
    from baq.run.checkpoint import RUN_FILE, partial_dir

    if args.output is None:
        if args.resume:
            raise UsageError("--resume continues a checkpoint of --output DIR: add --output")
        return
    partial = partial_dir(args.output)
    checkpoint.check_not_held(partial)  # another run writing this output now
    if args.resume and not (partial / RUN_FILE).is_file():
        raise UsageError(f"--resume: no checkpoint at {partial}; run without --resume")
    if args.resume:  # settings can be compared now; model and data once they are loaded
        try:
            checkpoint.check_settings(partial, asdict(cfg))
        except ValueError as err:
            raise UsageError(str(err)) from None
    if not args.resume and partial.exists():
        raise UsageError(
            f"{partial} holds an interrupted run: add --resume to continue it, "
            "or delete it to start over"
        )

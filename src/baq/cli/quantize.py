"""``baq quantize``: load, calibrate, quantize layer by layer, evaluate, report, save."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..config import (
    ALLOCATIONS,
    GRID_DIMS,
    HUB_TEXT_SOURCES,
    IMPORTANCES,
    METHODS,
    RANGE_DTYPES,
    SENSITIVITIES,
    QuantConfig,
)
from ..divergence import DEFAULT_TOPK
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
    log,
    positive,
)
from .measure import (
    add_adadim_arg,
    add_clip_arg,
    add_head_arg,
    add_measure_samples_arg,
    allocation_plan,
    check_measurement_args,
    measure_samples_of,
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
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from the checkpoint in OUTPUT.partial",
    )

    q.set_defaults(func=cmd_quantize)


def add_calib_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default="builtin", metavar="SRC", help="calibration text source")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=0, help="seed of the window positions")
    c.add_argument(
        "--calib-start",
        type=int,
        default=None,
        help="first token windows may start at (default 0, or the token after the evaluation "
        "windows when --calib and --eval read the same local text)",
    )
    c.add_argument("--calib-end", type=int, default=None, help="token index windows end before")


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
            act_order=args.act_order,
            percdamp=args.percdamp,
            block_size=args.block_size,
            integer_bits=args.integer_bits,
            sensitivity=args.sensitivity or ("analytic" if allocation == "model" else "measured"),
            exponent=args.exponent,
            max_levels=args.max_levels,
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


def validate_quantize(args: argparse.Namespace) -> tuple[QuantConfig, Any]:
    from ..activations import parse_size

    cfg = quant_config(args)
    args.measurement_file = check_measurement_args(args, cfg)
    try:
        args.max_activation_bytes = parse_size(args.max_activation_memory)
    except ValueError as err:
        raise UsageError(f"--max-activation-memory: {err}") from None
    positive("eval-windows", args.eval_windows)
    if args.eval_seqlen < 2:
        raise UsageError(f"--eval-seqlen={args.eval_seqlen}: use at least 2")
    for src in eval_sources(args):
        check_source(src, "--eval")
    calib = calib_config(args)
    if args.output is not None:
        check_output_folder(args.output, args.force)
    if args.report is not None:
        check_report_file(args.report)
    check_lazy(args)  # before check_model: a hub id or GGUF is refused without reading it
    config = check_model(args, args.seqlen, *([args.eval_seqlen] if eval_sources(args) else []))
    check_calib_fits(args, calib)
    check_eval_fits(args)
    plan_run_memory(args, cfg, config)  # sets args.max_activation_bytes (spill), or refuses
    return cfg, calib


def calib_config(args: argparse.Namespace) -> Any:
    """The :class:`~baq.data.CalibConfig` of the calibration arguments, checked."""
    from ..data import CalibConfig

    positive("nsamples", args.nsamples)
    if args.seqlen < 2:
        raise UsageError(f"--seqlen={args.seqlen}: use at least 2")
    check_source(args.calib, "--calib")
    try:
        return CalibConfig(
            source=args.calib,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            start=calib_start(args),
            end=args.calib_end,
        )
    except ValueError as err:
        raise UsageError(flagify(str(err))) from None


def calib_windows(tok: Any, calib_cfg: Any) -> Any:
    """(nsamples, seqlen) calibration token windows of a checked ``CalibConfig``."""
    from .. import data

    tokens = data.tokenize(tok, data.load_text(calib_cfg.source, split="train"))
    c = calib_cfg
    return data.calibration_windows(tokens, c.nsamples, c.seqlen, c.seed, c.start, c.end)


def calib_start(args: argparse.Namespace) -> int:
    """Where calibration windows may start: after the evaluated tokens when both read one text.

    Hub sources calibrate on their train split and evaluate on test, so they never overlap; a
    local file or ``builtin`` serves both, and perplexity measured on the calibration tokens
    would flatter every method.
    """
    if args.calib_start is not None:
        return args.calib_start
    if args.calib in HUB_TEXT_SOURCES or args.calib not in eval_sources(args):
        return 0
    if args.eval_windows is None:
        log.warning(
            "--calib %s is also evaluated in full: calibration and evaluation share tokens; "
            "set --eval-windows to keep them apart",
            args.calib,
        )
        return 0
    start = args.eval_windows * args.eval_seqlen
    log.info("calibration windows start at token %d, after the evaluation windows", start)
    return start


def cmd_quantize(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .. import checkpoint, models, report, streaming
    from ..evaluate import score_sets
    from ..pipeline import quantize_model

    cfg, calib_cfg = validate_quantize(args)
    check_resume(args, cfg)
    device = models.resolve_device(args.device)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    loader = None
    if args.lazy:
        model, tok, loader = load_lazy(args)
    else:
        model, tok = load(args)
    seconds["load"] = time.perf_counter() - t

    t = time.perf_counter()
    calib = calib_windows(tok, calib_cfg)
    sets = eval_sets(args, tok)
    seconds["data"] = time.perf_counter() - t

    before: dict[str, float] = {}
    base_records: dict[str, Any] = {}
    if sets and not args.skip_before:
        t = time.perf_counter()
        if loader is not None:
            scored = streamed_scores(loader, sets, device, "before", record_topk=DEFAULT_TOPK)
        else:
            model.to(device)
            scored = score_sets(model, sets, device, "before", record_topk=DEFAULT_TOPK)
            model.to("cpu")
        # the float model's compact log-probabilities: KL of the quantized model against it
        before = {name: sc.perplexity for name, sc in scored.items()}
        base_records = {name: sc.base_record for name, sc in scored.items()}
        seconds["eval_before"] = time.perf_counter() - t

    ckpt, done = None, 0
    if args.output is not None:
        # a lazy model is hashed a block at a time, read from disk: the digest of a full load
        tensors = None if loader is None else streaming.state_items(model, loader)
        ckpt = checkpoint.Checkpoint(
            checkpoint.partial_dir(args.output),
            checkpoint.fingerprint(model, calib, cfg, tensors),
        )
        done = ckpt.open(resume=args.resume)
        if done:
            log.info("resuming after %d finished blocks from %s", done, ckpt.folder)
    plan = None
    if cfg.allocation == "model":
        t = time.perf_counter()
        folder = None if ckpt is None else ckpt.folder
        plan, measured = allocation_plan(args, model, calib, cfg, device, loader, folder)
        if measured:
            seconds["measure"] = time.perf_counter() - t
    try:
        run = quantize_model(
            model,
            calib,
            cfg,
            device=device,
            on_block_done=None if ckpt is None else ckpt.save_block,
            start_block=done,
            restore_block=None if ckpt is None else ckpt.load_block,
            loader=loader,
            max_activation_bytes=args.max_activation_bytes,
            plan=plan,
        )
    except KeyboardInterrupt:
        if ckpt is not None:
            log.warning("finished blocks kept in %s: rerun with --resume", ckpt.folder)
        raise
    seconds["quantize"] = run.seconds

    after: dict[str, float] = {}
    kl: dict[str, dict[str, float]] = {}
    if sets:
        t = time.perf_counter()
        if loader is not None:
            on_load = streaming.quantized_on_load(loader, run.results)
            scored = streamed_scores(
                loader, sets, device, "after", on_load, base_records=base_records
            )
        else:
            model.to(device)
            scored = score_sets(model, sets, device, "after", base_records=base_records)
        after = {name: sc.perplexity for name, sc in scored.items()}
        kl = {name: sc.divergence for name, sc in scored.items() if sc.divergence}
        seconds["eval_after"] = time.perf_counter() - t

    storage_bits = folder_bytes = None
    if args.output is not None:
        from .. import storage
        from ..manifest import folder_bytes as size_of

        t = time.perf_counter()
        if loader is None:
            model.to("cpu")
        summary = {"nominal_bits": run.nominal_bits, "perplexity_after": after, "divergence": kl}
        storage.save_quantized(
            args.output, model, tok, run.results, cfg, summary, args.force, loader=loader
        )
        storage_bits = storage.storage_bits(args.output)
        folder_bytes = size_of(args.output)
        seconds["save"] = time.perf_counter() - t
        ckpt.remove()  # the save landed: the checkpoint has served

    rep = report.build_report(
        model=args.model or "reference:SmolLM2-135M-Instruct.Q4_1",
        quant=asdict(cfg),
        calib=asdict(calib_cfg),
        records=run.records,
        seconds=seconds,
        perplexity={k: {"before": before.get(k), "after": after.get(k)} for k in sets},
        storage_bits=storage_bits,
        divergence=kl,
        memory_plan=None if args.memory_plan is None else args.memory_plan.as_dict(),
        folder_bytes=folder_bytes,
        parameters=report.parameter_count(model),
    )
    if args.report is not None:
        report.write_json(args.report, rep)
    if not args.quiet:
        print(report.format_summary(rep))
        if storage_bits is not None:
            print(
                f"saved {args.output}  ({storage_bits:.3f} storage bits per quantized weight; "
                f"{folder_bytes:,} bytes, {rep['folder_bits_per_parameter']:.3f} bits per "
                f"parameter of the whole model)"
            )
    return 0


def streamed_scores(
    loader: Any, sets: dict[str, Any], device: Any, when: str, on_load: Any = None, **base: Any
) -> dict[str, Any]:
    """Scores (:func:`baq.evaluate.score_sets`) of a lazily loaded model, each block read from disk
    as the forward reaches it.

    Memory stays one block, at the price of reading every block once per evaluation window
    (the page cache serves repeats when the model fits in it). ``on_load`` writes the
    quantized weights into each block as it is loaded (after quantization).
    """
    from ..evaluate import score_sets

    loader.to(device)
    try:
        with loader.streaming(on_load=on_load):
            return score_sets(loader.model, sets, device, when, **base)
    finally:
        loader.to("cpu")


def check_resume(args: argparse.Namespace, cfg: QuantConfig) -> None:
    """``--resume`` needs ``--output`` and its checkpoint, with the same settings; a leftover
    checkpoint needs ``--resume``."""
    from dataclasses import asdict

    from .. import checkpoint
    from ..checkpoint import RUN_FILE, partial_dir

    if args.output is None:
        if args.resume:
            raise UsageError("--resume continues a checkpoint of --output DIR: add --output")
        return
    partial = partial_dir(args.output)
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

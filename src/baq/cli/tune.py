"""``baq tune SAVED --output NEW``: distil a saved quantized model into its float model
(:mod:`baq.run.tune`): codes fixed, ranges (and with ``--tune-norms`` the norms) trained on the
KL divergence to the float model's next-token distribution; the same format and size."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import DEFAULT_TOPK, DEFAULT_TUNE_SEQLEN, DEFAULT_TUNE_STEPS
from .calibration import add_calib_args, calib_config, calib_windows
from .common import (
    UsageError,
    add_eval_args,
    check_calib_fits,
    check_eval_fits,
    check_model,
    check_output_folder,
    check_report_file,
    check_source,
    eval_sets,
    eval_sources,
    flagify,
    log,
    positive,
)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    t = sub.add_parser(
        "tune",
        parents=[common],
        help="distil a saved quantized model into its float model (ranges trained, codes kept)",
    )
    t.add_argument("saved", type=Path, help="a folder written by baq quantize --output")
    g = t.add_argument_group("float model (the teacher)")
    g.add_argument(
        "--base",
        metavar="MODEL",
        help="hub id, folder or .gguf of the float model (default: the base_model the saved "
        "folder names; 'reference' for the built-in reference model)",
    )
    g.add_argument("--base-gguf-file", help="GGUF file name inside --base (a repo or folder)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    d = t.add_argument_group("distillation")
    d.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_TUNE_STEPS,
        help=f"optimizer steps (default {DEFAULT_TUNE_STEPS})",
    )
    d.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate (cosine)")
    d.add_argument("--batch", type=int, default=1, help="calibration windows per step")
    d.add_argument("--tune-norms", action="store_true", help="train the norm weights too")
    d.add_argument(
        "--topk",
        type=int,
        default=DEFAULT_TOPK,
        help="top tokens per position kept of the float model's distribution (the rest merged)",
    )
    d.add_argument("--checkpoint-every", type=int, default=25, metavar="N", help="steps")
    d.add_argument(
        "--train-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="matrix products of the training steps (bfloat16: autocast, about 2x faster on "
        "CPUs with bfloat16 units; parameters and the KL stay float32; auto, the default: "
        "bfloat16 where the CPU or GPU has bfloat16 units, else float32)",
    )
    add_calib_args(t)
    t.set_defaults(seqlen=DEFAULT_TUNE_SEQLEN)  # shorter than quantize's: see baq.config
    add_eval_args(t, default=["builtin"], windows=16)
    o = t.add_argument_group("output")
    o.add_argument("--output", type=Path, required=True, help="the tuned folder")
    o.add_argument("--force", action="store_true", help="replace an existing --output folder")
    o.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in OUTPUT.partial"
    )
    o.add_argument("--report", type=Path, help="write the JSON report here")
    t.set_defaults(func=cmd_tune)


def tune_config(args: argparse.Namespace) -> Any:
    from baq.run.tune import TuneConfig

    try:
        return TuneConfig(
            steps=args.steps,
            lr=args.lr,
            batch=args.batch,
            tune_norms=args.tune_norms,
            topk=args.topk,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            train_dtype=args.train_dtype,
        )
    except ValueError as err:
        raise UsageError(flagify(str(err))) from None


def base_args(args: argparse.Namespace, qconfig: dict) -> argparse.Namespace:
    """A namespace naming the teacher as the model commands take it (``model``, ``gguf_file``)."""
    from baq.run.tune_setup import base_of

    if args.base is None:
        model, found = base_of(qconfig)
        if not found:
            raise UsageError(
                f"{args.saved} names no base model (it was quantized from a local model): "
                "pass the float model with --base MODEL"
            )
    else:
        model = None if args.base == "reference" else args.base
    return argparse.Namespace(**{**vars(args), "model": model, "gguf_file": args.base_gguf_file})


def validate(args: argparse.Namespace) -> tuple[Any, Any, argparse.Namespace, dict]:
    """Every check that needs no weights. Returns ``(cfg, calib_config, teacher args,
    quantization_config)``."""
    from baq.run.checkpoint import check_not_held, partial_dir
    from baq.saved.manifest import is_baq_save

    cfg = tune_config(args)
    if not is_baq_save(args.saved):
        raise UsageError(
            f"{args.saved}: not a saved baq model (no baq manifest.json); write one with "
            "baq quantize --output"
        )
    from baq.run.tune_setup import source_config

    try:
        qconfig = source_config(args.saved)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.output.expanduser().absolute() == args.saved.expanduser().absolute():
        raise UsageError(f"--output {args.output}: is the folder being tuned; choose a new one")
    positive("eval-windows", args.eval_windows)
    if args.eval_seqlen < 2:
        raise UsageError(f"--eval-seqlen={args.eval_seqlen}: use at least 2")
    for src in eval_sources(args):
        check_source(src, "--eval")
    args.model, args.gguf_file = str(args.saved), None  # the text checks read its tokenizer
    calib = calib_config(args)
    check_output_folder(args.output, args.force)
    partial = partial_dir(args.output)
    check_not_held(partial)
    if args.resume and not partial.is_dir():
        raise UsageError(f"--resume: no checkpoint at {partial}; run without --resume")
    if not args.resume and partial.exists():
        raise UsageError(
            f"{partial} holds an interrupted tuning run: add --resume to continue it, or "
            "delete it to start over"
        )
    if args.report is not None:
        check_report_file(args.report)
    teacher = base_args(args, qconfig)
    config = check_model(teacher, args.seqlen, *([args.eval_seqlen] if eval_sources(args) else []))
    saved_vocab = _saved_vocab(args.saved)
    if config is not None and saved_vocab is not None and config.vocab_size != saved_vocab:
        raise UsageError(
            f"--base {args.base}: a {config.vocab_size}-token vocabulary, the saved model "
            f"{saved_vocab}: another model family; pass the model {args.saved} was quantized from"
        )
    check_calib_fits(args, calib)
    check_eval_fits(args)
    if config is not None:
        plan_memory(args, cfg, config, teacher)
    return cfg, calib, teacher, qconfig


def _saved_vocab(folder: Path) -> int | None:
    import json

    try:
        return int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_memory(args: argparse.Namespace, cfg: Any, config: Any, teacher: Any) -> None:
    """Refuse, before any weight loads, a run whose memory estimate does not fit."""
    from baq.run import memory_estimate as me
    from baq.run.tune_setup import estimate_memory

    from .memory import weight_file_bytes

    evaluating = bool(eval_sources(args))
    gguf = teacher.gguf_file is not None or (teacher.model or ".gguf").endswith(".gguf")
    try:
        me.model_shape(config)
    except Exception as err:  # an architecture the meta device cannot build: run unplanned
        log.info("memory not planned: cannot build %s without weights (%s)", type(config), err)
        return
    est = estimate_memory(
        config,
        args.saved,
        cfg,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_seqlen=args.eval_seqlen if evaluating else None,
        eval_windows=args.eval_windows,
        dtype=me.model_dtype(config, args.dtype, gguf),
        file_bytes=weight_file_bytes(teacher.model, teacher.gguf_file),
        gguf=gguf,
    )
    try:
        plan = me.admit(
            est, nsamples=args.nsamples, seqlen=args.seqlen, max_activation_bytes=None,
            lazy=True, lazy_possible=False, evaluating=evaluating,
        )  # fmt: skip
    except me.MemoryPlanError:
        need = est.peak(spilled=True) - est.resident
        raise UsageError(
            f"tuning needs about {me.format_size(need)} of memory (float model and packed "
            f"model {me.format_size(est.weights)}, float model's records "
            f"{me.format_size(est.base_record)}, training {me.format_size(est.tune)}) but only "
            f"{me.format_size(me.available_memory())} is available: lower --nsamples, --seqlen "
            "or --topk, or use --dtype bfloat16"
        ) from None
    log.info("%s", plan.describe())


def cmd_tune(args: argparse.Namespace) -> int:
    from baq.model import loader
    from baq.run import report
    from baq.run.tune_setup import tune

    cfg, calib_cfg, _, _ = validate(args)
    tok = loader.load_tokenizer(str(args.saved))
    calib = calib_windows(tok, calib_cfg)
    sets = eval_sets(args, tok)
    result = tune(
        args.saved, args.output, base=args.base,
        config=cfg, calibration=calib, evaluation=sets, device=args.device,
        resume=args.resume, force=args.force, base_gguf_file=args.base_gguf_file,
        dtype=args.dtype,
    )  # fmt: skip
    rep = result.report
    if args.report is not None:
        report.write_json(args.report, rep)
    if not args.quiet:
        print(format_summary(rep))
    return 0


def format_summary(rep: dict) -> str:
    """Before/after lines: the check windows' KL, and each evaluation set's perplexity and KL."""
    t = rep["tuning"]
    lines = [
        f"tuned {t['tuned_parameters']:,} parameters ({', '.join(t['trainable'])}) in "
        f"{t['steps']} steps of {t['batch']} window(s), lr {t['lr']:g}",
    ]
    if t.get("kl_check_before") is not None:
        lines.append(
            f"KL on {t['check_windows']} calibration windows: {t['kl_check_before']:.5f} before, "
            f"{t['kl_check_trained']:.5f} trained, {t['kl_check_rounded']:.5f} with the stored "
            "(rounded) ranges"
        )
    for name, ppl in rep["perplexity"].items():
        kl = rep["divergence"][name]
        kls = [d["kl_mean"] if d else float("nan") for d in (kl["before"], kl["after"])]
        lines.append(
            f"{name}: perplexity {ppl['before']:.3f} -> {ppl['after']:.3f} (float "
            f"{ppl['float']:.3f}); KL {kls[0]:.5f} -> {kls[1]:.5f}"
        )
    if "output" in rep:
        lines.append(f"saved {rep['output']}")
    if rep.get("seconds"):
        stages = ", ".join(f"{k} {v:.0f}" for k, v in rep["seconds"].items())
        lines.append(f"seconds: {stages}")
    return "\n".join(lines)

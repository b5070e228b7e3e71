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
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from baq.saved.export import EXPORT_DTYPES, export_dequantized

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
    out = export_dequantized(args.folder, target, EXPORT_DTYPES[args.dtype])
    print(f"exported {args.folder} ({args.dtype}, dequantized) to {out}")
    return 0

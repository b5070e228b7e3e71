"""The ``baq`` command: parse, validate, call the library. No quantization logic lives here.

Every argument is checked before a model is loaded; a bad one ends the run with a single line on
stderr and exit code 2. One module per group of commands; ``common`` holds what they share.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from baq.run.memory_estimate import out_of_memory

from .. import __version__
from . import bench, export, measure, quantize, saved, tune
from .common import UsageError, error_line, interrupted_line

__all__ = ["UsageError", "build_parser", "main"]


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flags, invalid choices, missing arguments) are one line
    naming the problem, like the errors found after parsing, instead of a usage block first."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"baq: error: {message} (see '{self.prog} -h')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="baq",
        description="Post-training LLM weight quantization: RTN, GPTQ and BAQ bit allocation.",
    )
    parser.add_argument("--version", action="version", version=f"baq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="-v per-layer log")
    common.add_argument("-q", "--quiet", action="store_true", help="errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    quantize.add_parser(sub, common)
    saved.add_parsers(sub, common)
    measure.add_parsers(sub, common)
    export.add_parser(sub, common)
    bench.add_parser(sub, common)
    tune.add_parser(sub, common)
    return parser


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
    # a long run says where it is at the default verbosity: one line per stage, and every few
    # blocks where no progress bar shows (nohup, CI logs, a notebook's captured output)
    logging.getLogger("baq.progress").setLevel(
        min(level, logging.INFO) if not args.quiet else level
    )
    if args.quiet:  # errors only: no progress bars, transformers' included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # transformers' GGUF conversion calls tqdm directly; tqdm reads its defaults from TQDM_*
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"baq: {interrupted_line(args)}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, MemoryError) as err:  # also full disks, memory
        if isinstance(err, (RuntimeError, MemoryError)) and not out_of_memory(err):
            raise
        print(f"baq: error: {error_line(err, args)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

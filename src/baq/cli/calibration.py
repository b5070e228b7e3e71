"""Calibration arguments shared by ``baq quantize`` and ``baq measure``: the windows' source,
count, length, seed and token range, checked before any model loads."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    UsageError,
    calib_fit_error,
    check_source,
    eval_note,
    eval_sources,
    flagify,
    log,
    positive,
)


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


def calib_config(args: argparse.Namespace) -> Any:
    """The :class:`~baq.data.CalibConfig` of the calibration arguments, checked."""
    from ..data import CalibConfig

    positive("nsamples", args.nsamples)
    if args.seqlen < 2:
        raise UsageError(f"--seqlen={args.seqlen}: use at least 2")
    check_source(args.calib, "--calib")
    if args.calib_start is not None and args.calib_start < 0:
        raise UsageError(f"--calib-start={args.calib_start}: use a token index >= 0")
    start = calib_start(args)
    if args.calib_end is not None and args.calib_end - start <= args.seqlen:
        note = eval_note(args, start)
        after = f"token {start}" + (
            f" ({note})" if note else " (--calib-start)" if args.calib_start is not None else ""
        )
        raise UsageError(
            f"--calib-end={args.calib_end} leaves no room for {args.seqlen}-token windows after "
            f"{after}: use --calib-end > {start + args.seqlen}"
        )
    try:
        return CalibConfig(
            source=args.calib,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            start=start,
            end=args.calib_end,
        )
    except ValueError as err:
        raise UsageError(flagify(str(err))) from None


def calib_windows(tok: Any, calib_cfg: Any) -> Any:
    """(nsamples, seqlen) calibration token windows of a checked ``CalibConfig``."""
    from .. import data

    tokens = data.tokenize(tok, data.load_text(calib_cfg.source, split="train"))
    c = calib_cfg
    why = calib_fit_error(c, int(tokens.numel()))  # a hub text, not checked before the load
    if why is not None:
        raise UsageError(f"--calib {c.source}: {why}")
    return data.calibration_windows(tokens, c.nsamples, c.seqlen, c.seed, c.start, c.end)


def calib_start(args: argparse.Namespace) -> int:
    """Where calibration windows may start (:func:`baq.data.calibration_start`), or
    ``--calib-start`` when given."""
    from baq import data

    if args.calib_start is not None:
        return args.calib_start
    start = data.calibration_start(
        args.calib, eval_sources(args), args.eval_windows, args.eval_seqlen
    )
    if start is None:
        log.warning(
            "--calib %s is also evaluated in full: calibration and evaluation share tokens; "
            "set --eval-windows to keep them apart",
            args.calib,
        )
        return 0
    if start:
        log.info("calibration windows start at token %d, after the evaluation windows", start)
    return start

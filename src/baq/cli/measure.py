"""``baq measure`` and ``baq plan``: the model-level allocation's measurement, as a file of its
own, and the plans it gives at any budget (inside ``baq quantize --allocation model`` the same
stage is :func:`baq.run.session.measurement_for`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..config import (
    ADADIM_CRITERIA,
    GRID_DIMS,
    IMPORTANCES,
    RANGE_DTYPES,
    SENSITIVITIES,
    QuantConfig,
)
from .common import (
    UsageError,
    add_model_args,
    check_calib_fits,
    check_lazy,
    check_model,
    check_report_file,
    flagify,
    load,
    positive,
    refuse_saved_model,
)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    from .calibration import add_calib_args

    m = sub.add_parser(
        "measure",
        parents=[common],
        help="measure per-layer importance and per-column sensitivity for --allocation model",
    )
    add_model_args(m)
    g = m.add_argument_group("measurement")
    g.add_argument("--output", type=Path, required=True, metavar="FILE", help="write it here")
    g.add_argument(
        "--importance",
        nargs="+",
        default=["fisher"],
        choices=IMPORTANCES,
        help="importance estimators to run (one or both)",
    )
    g.add_argument(
        "--importance-samples", type=int, default=QuantConfig.importance_samples, metavar="N"
    )
    add_measure_samples_arg(g)
    g.add_argument("--sensitivity", default="analytic", choices=SENSITIVITIES)
    g.add_argument("--bits", type=float, default=3.0, help="probe budget of measured sensitivities")
    g.add_argument("--group-size", type=int, default=None)
    g.add_argument("--sym", action="store_true")
    g.add_argument("--dim", default="oc", choices=GRID_DIMS, help="grid dimension, as quantize's")
    add_adadim_arg(g)
    add_clip_arg(g)
    add_rotate_arg(g)
    g.add_argument("--percdamp", type=float, default=0.01)
    g.add_argument("--hessian-dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--range-dtype", default="float16", choices=RANGE_DTYPES)
    g.add_argument("--skip", action="append", default=[], metavar="PATTERN")
    add_head_arg(g)
    g.add_argument("--max-activation-memory", metavar="SIZE", default=None)
    g.add_argument(
        "--lazy",
        action="store_true",
        help="read one decoder block at a time from a local safetensors folder (the Fisher "
        "pass too; the noise estimator needs the whole model)",
    )
    add_calib_args(m)
    m.set_defaults(
        func=cmd_measure, eval=None, eval_default=[], eval_windows=None, eval_seqlen=None
    )

    p = sub.add_parser(
        "plan", parents=[common], help="bits per layer of a model-level allocation, no quantizing"
    )
    p.add_argument("--measurement", type=Path, required=True, metavar="FILE")
    p.add_argument("--bits", type=float, default=3.0, help="target average bits per weight")
    p.add_argument("--integer-bits", action="store_true", help="power-of-two levels only")
    p.add_argument("--importance", default="fisher", choices=IMPORTANCES)
    p.add_argument("--exponent", type=float, default=2.0)
    p.add_argument("--max-levels", type=int, default=256)
    p.add_argument(
        "--min-levels",
        type=int,
        default=None,
        help="floor on levels per column (default: 2 for a rotated measurement, else 1)",
    )
    p.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=[2.0, 2.5, 3.0, 3.5, 4.0],
        help="also print the modelled loss at these budgets",
    )
    p.set_defaults(func=cmd_plan)


def measure_config(args: argparse.Namespace) -> QuantConfig:
    try:
        return QuantConfig(
            method="baq",
            bits=args.bits,
            allocation="model",
            sensitivity=args.sensitivity,
            importance=args.importance[0],
            importance_samples=args.importance_samples,
            measure_samples=measure_samples_of(args),
            group_size=args.group_size,
            sym=args.sym,
            dim=args.dim,
            adadim=args.adadim,
            clip=args.clip,
            **rotation_of(args),
            percdamp=args.percdamp,
            hessian_dtype=args.hessian_dtype,
            range_dtype=args.range_dtype,
            skip=tuple(args.skip),
            include_head=args.include_head,
        )
    except ValueError as err:
        raise UsageError(flagify(str(err))) from None


def add_measure_samples_arg(g: Any) -> None:
    """``--measure-samples``, shared by ``baq quantize`` and ``baq measure``."""
    g.add_argument(
        "--measure-samples",
        default=str(QuantConfig.measure_samples),
        metavar="N",
        help="calibration windows the measurement's Hessians read (the sensitivities of "
        "--allocation model); 'all' for every window (default %(default)s)",
    )


def measure_samples_of(args: argparse.Namespace) -> int | None:
    """``--measure-samples`` as the config field: a positive count, or None for 'all'."""
    if args.measure_samples == "all":
        return None
    try:
        n = int(args.measure_samples)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(
            f"--measure-samples {args.measure_samples}: use a positive number of windows, "
            "e.g. 32, or all"
        )
    return n


def add_adadim_arg(g: Any) -> None:
    """``--adadim``, shared by ``baq quantize``, ``baq measure`` and ``baq bench``."""
    g.add_argument(
        "--adadim",
        default="proxy",
        choices=ADADIM_CRITERIA,
        help="how --dim auto picks each layer's grid: the smaller RTN proxy error on the layer's "
        "Hessian (proxy, default: no extra pass) or the smaller block output error of RTN on 8 "
        "calibration windows (block: the AdaDim paper's, two block forwards per linear)",
    )


def add_clip_arg(g: Any, bench: bool = False) -> None:
    """``--clip``, shared by ``baq quantize``, ``baq measure`` and ``baq bench``."""
    if bench:
        g.add_argument(
            "--clip",
            action="store_true",
            help="also run every variant with clipped ranges (-clip in the name)",
        )
        return
    g.add_argument(
        "--clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shrink each per-OC range (x1 to x0.5) where that rounds its row with the least "
        "H-diagonal-weighted error at the layer's levels, clipping the few largest weights "
        "(default: on wherever ranges are per OC, i.e. not with --dim ic; --no-clip: min/max "
        "ranges)",
    )


def add_rotate_arg(g: Any, bench: bool = False) -> None:
    """``--rotate``, shared by ``baq quantize``, ``baq measure`` and ``baq bench``."""
    if bench:
        g.add_argument(
            "--rotate",
            action="store_true",
            help="also run every variant rotated (-rot in the name)",
        )
        return
    g.add_argument(
        "--rotate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize each linear in the basis of a seeded randomized Hadamard transform of its "
        "inputs (incoherence processing, as QuIP#), applied again to the inputs at run time; "
        "widths 2^k or 12/20/28/36 x 2^k (others stay unrotated). Default: on for baq and gptq "
        "(not with --adadim block), off for rtn; --no-rotate: the plain basis",
    )
    g.add_argument(
        "--rotate-seed",
        type=rotate_seed,
        default=None,
        metavar="N",
        help="seed of the rotations (default 0); each layer's transform is drawn from it and "
        "the layer's name, and saved as that seed",
    )


def rotate_seed(text: str) -> int:
    """``--rotate-seed``: an integer in [0, 2^63) (argparse's one-line error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r}: use an integer from 0 to 2^63 - 1, e.g. 0")
    return value


def rotation_of(args: Any) -> dict[str, Any]:
    """``rotate`` and ``rotate_seed`` of a :class:`QuantConfig` from ``--rotate``,
    ``--rotate-seed`` (``rotate`` None: the config's default); a seed with ``--no-rotate`` is a
    mistake said in one line."""
    if args.rotate_seed is not None and args.rotate is False:
        raise UsageError(
            f"--rotate-seed {args.rotate_seed} has no effect with --no-rotate: drop one of them"
        )
    return {"rotate": args.rotate, "rotate_seed": args.rotate_seed or 0}


def add_head_arg(g: Any) -> None:
    """``--include-head``, shared by ``baq quantize`` and ``baq measure``."""
    g.add_argument(
        "--include-head",
        action="store_true",
        help="the output head is one more layer after the last block: quantized (a tied input "
        "embedding then reads the quantized matrix), and measured for --allocation model",
    )


def cmd_measure(args: argparse.Namespace) -> int:
    from baq.model import loader as models
    from baq.run import checkpoint, measure, streaming
    from baq.run.activations import parse_size

    from .calibration import calib_config, calib_windows
    from .common import load_lazy

    cfg = measure_config(args)
    try:
        max_bytes = parse_size(args.max_activation_memory)
    except ValueError as err:
        raise UsageError(f"--max-activation-memory: {err}") from None
    calib_cfg = calib_config(args)
    check_report_file(args.output, "--output")
    refuse_saved_model(args.model, "measure")
    check_lazy(args)
    estimators = tuple(dict.fromkeys(args.importance))
    if args.lazy and "noise" in estimators:
        raise UsageError(measure.NOISE_NEEDS_WHOLE_MODEL)
    check_model(args, args.seqlen)
    check_calib_fits(args, calib_cfg)
    device = models.resolve_device(args.device)
    loader = None
    if args.lazy:
        model, tok, loader = load_lazy(args)
    else:
        model, tok = load(args)
    calib = calib_windows(tok, calib_cfg)
    items = model.state_dict().items() if loader is None else streaming.state_items(model, loader)
    digest = checkpoint.tensor_digest(items)
    t = time.perf_counter()
    meas = measure.measure_model(
        model,
        calib,
        cfg,
        estimators,
        device,
        digest,
        max_activation_bytes=max_bytes,
        on_stage=lambda m: m.save(args.output),  # each finished estimator lands at once
        loader=loader,
    )
    if not args.quiet:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in meas.seconds.items())
        print(f"measured {len(meas.names)} layers in {time.perf_counter() - t:.1f} s ({stages})")
        print(f"saved {args.output}; plan budgets with: baq plan --measurement {args.output}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from baq.run.allocation import format_plan, plan_levels

    meas = _read(args.measurement)
    rotated = meas.settings.get("rotate") is True  # the quantization run's default floor
    floor = {"rotate": rotated, "min_levels": args.min_levels}
    try:
        cfg = QuantConfig(
            method="baq",
            bits=args.bits,
            allocation="model",
            integer_bits=args.integer_bits,
            importance=args.importance,
            exponent=args.exponent,
            max_levels=args.max_levels,
            **floor,
        )
        budgets = [
            QuantConfig(method="baq", bits=b, max_levels=args.max_levels, **floor).bits
            for b in args.budgets
        ]
    except ValueError as err:
        raise UsageError(flagify(str(err))) from None
    try:
        plans = plan_levels(meas, cfg)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(format_plan(plans, budgets, meas, cfg))
    return 0


def _read(path: Path) -> Any:
    from baq.run.measure import Measurement

    if not path.is_file():
        raise UsageError(f"--measurement {path}: no such file; write one with baq measure")
    try:
        return Measurement.load(path)
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_measurement_args(args: argparse.Namespace, cfg: QuantConfig) -> Any:
    """``baq quantize``: the model allocation's options, before any model loads.

    Returns:
        The :class:`~baq.run.measure.Measurement` of ``--measurement``, or None.
    """
    from baq.run import measure

    positive("importance-samples", args.importance_samples)
    if args.measurement is not None and cfg.allocation != "model":
        other = f"--method {cfg.method}" if cfg.method != "baq" else "--allocation layer"
        raise UsageError(
            f"--measurement serves BAQ's --allocation model, not {other}: drop one of them"
        )
    if cfg.allocation == "model" and args.lazy and args.measurement is None:
        if cfg.importance == "noise":
            raise UsageError(measure.NOISE_NEEDS_WHOLE_MODEL)
    if args.measurement is None:
        return None
    meas = _read(args.measurement)
    try:
        meas.betas(cfg.importance)
        meas.check(measure.config_settings(cfg), config_only=True)  # weights and data: loaded
    except ValueError as err:
        raise UsageError(str(err)) from None
    return meas

"""``baq quantize``'s memory plan, made from the config before the weights load
(:mod:`baq.memory_plan`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .checks import UsageError, eval_sources, log


def weight_file_bytes(model: str | None, gguf_file: str | None) -> int:
    """Size of the weight files a full load maps (0 for a hub id not on disk)."""
    from .. import models

    try:
        source, gguf = models._resolve_source(model, gguf_file)
    except (OSError, ValueError):
        return 0
    folder = Path(source)
    if gguf:
        return (folder / gguf).stat().st_size
    if not folder.is_dir():
        return 0
    files = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    return sum(f.stat().st_size for f in files)


def importance_windows(args: argparse.Namespace, cfg: Any) -> int:
    """Windows the model-level allocation's importance pass holds the activations of (0 when
    there is none: another allocation, or a measurement given with --measurement)."""
    if cfg.allocation != "model" or getattr(args, "measurement", None) is not None:
        return 0
    from ..importance import NOISE_WINDOWS

    return NOISE_WINDOWS if cfg.importance == "noise" else cfg.importance_samples


def plan_run_memory(args: argparse.Namespace, cfg: Any, config: Any) -> Any:
    """Estimate the run, decide where the activations go (``args.max_activation_bytes``), or
    refuse with one line. Stores the plan in ``args.memory_plan`` (None for a saved folder)."""
    from .. import memory_plan
    from ..lazy import can_load_lazily

    args.memory_plan = None
    if config is None:
        return None
    evaluating = bool(eval_sources(args))
    gguf = args.gguf_file is not None or (args.model or ".gguf").endswith(".gguf")
    try:
        shape = memory_plan.model_shape(config)
    except Exception as err:  # an architecture the meta device cannot build: run unplanned
        log.info("memory not planned: cannot build %s without weights (%s)", type(config), err)
        return None
    est = memory_plan.estimate(
        config,
        shape=shape,
        method=cfg.method,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_seqlen=args.eval_seqlen if evaluating else None,
        eval_windows=args.eval_windows,
        dtype=memory_plan.model_dtype(config, args.dtype, gguf),
        hessian_dtype=cfg.hessian_dtype,
        lazy=args.lazy,
        file_bytes=0 if args.lazy else weight_file_bytes(args.model, args.gguf_file),
        gguf=gguf,
        saving=args.output is not None,
        include_head=cfg.include_head,
        importance_windows=importance_windows(args, cfg),
    )
    try:
        plan = memory_plan.plan(
            est,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            max_activation_bytes=args.max_activation_bytes,
            lazy=args.lazy,
            lazy_possible=can_load_lazily(args.model, args.gguf_file),
            evaluating=evaluating,
        )
    except memory_plan.MemoryPlanError as err:
        raise UsageError(str(err)) from None
    log.info("%s", plan.describe())
    if plan.auto_spill:
        log.warning(
            "with its calibration activations (%s) in RAM the run would need about %s, more "
            "than the %s available: they spill to %s (%s free); results are identical, only "
            "slower",
            memory_plan.format_size(est.activations),
            memory_plan.format_size(est.peak(spilled=False) - est.resident),
            memory_plan.format_size(plan.available),
            plan.spill_dir,
            memory_plan.format_size(plan.disk_free),
        )
    args.max_activation_bytes = plan.max_activation_bytes
    args.memory_plan = plan
    return plan

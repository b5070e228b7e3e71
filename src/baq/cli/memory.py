"""``baq quantize``'s memory plan, made from the config before the weights load
(:mod:`baq.run.memory_estimate`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .checks import UsageError, eval_sources, log


def weight_file_bytes(model: str | None, gguf_file: str | None) -> int:
    """Size of the weight files a full load maps (0 for a hub id not on disk)."""
    from baq.model import loader

    try:
        source, gguf = loader._resolve_source(model, gguf_file)
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
    from baq.run.importance import NOISE_WINDOWS

    return NOISE_WINDOWS if cfg.importance == "noise" else cfg.importance_samples


def plan_run_memory(
    args: argparse.Namespace, cfg: Any, config: Any, max_activation_bytes: int | None
) -> Any:
    """Estimate the run and decide where the activations go, or refuse with one line.

    Returns:
        The :class:`~baq.run.memory_estimate.MemoryPlan` (its ``max_activation_bytes`` is the
        budget the run gets), or None when the model's shape cannot be known beforehand.
    """
    from baq.model.lazy import can_load_lazily
    from baq.run import memory_estimate
    from baq.saved.shards import parse_shard_size

    if config is None:
        return None
    evaluating = bool(eval_sources(args))
    gguf = args.gguf_file is not None or (args.model or ".gguf").endswith(".gguf")
    try:
        shape = memory_estimate.model_shape(config)
    except Exception as err:  # an architecture the meta device cannot build: run unplanned
        log.info("memory not planned: cannot build %s without weights (%s)", type(config), err)
        return None
    est = memory_estimate.estimate(
        config,
        shape=shape,
        method=cfg.method,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_seqlen=args.eval_seqlen if evaluating else None,
        eval_windows=args.eval_windows,
        dtype=memory_estimate.model_dtype(config, args.dtype, gguf),
        hessian_dtype=cfg.hessian_dtype,
        lazy=args.lazy,
        file_bytes=0 if args.lazy else weight_file_bytes(args.model, args.gguf_file),
        gguf=gguf,
        saving=args.output is not None,
        include_head=cfg.include_head,
        importance_windows=importance_windows(args, cfg),
        rotate=cfg.rotate,
        planned=cfg.allocation == "model",
        shard_bytes=parse_shard_size(args.max_shard_size),  # checked before: a valid size
    )
    try:
        plan = memory_estimate.admit(
            est,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            max_activation_bytes=max_activation_bytes,
            lazy=args.lazy,
            lazy_possible=can_load_lazily(args.model, args.gguf_file),
            evaluating=evaluating,
        )
    except memory_estimate.MemoryPlanError as err:
        raise UsageError(str(err)) from None
    log.info("%s", plan.describe())
    if plan.auto_spill:
        log.warning(
            "with its calibration activations (%s) in RAM the run would need about %s, more "
            "than the %s available: they spill to %s (%s free); results are identical, only "
            "slower",
            memory_estimate.format_size(est.activations),
            memory_estimate.format_size(est.peak(spilled=False) - est.resident),
            memory_estimate.format_size(plan.available),
            plan.spill_dir,
            memory_estimate.format_size(plan.disk_free),
        )
    return plan

"""Run reports: the JSON a quantization leaves behind, and the tables printed from it."""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from baq import atomic
from baq.quant.layer import LayerRecord

REPORT_VERSION = 1


def peak_rss_gib() -> float:
    """Peak resident memory of this process in GiB.

    Linux's ``VmHWM`` when readable, since ``reset_peak_memory`` can lower it between runs of one
    process; otherwise ``ru_maxrss``, the peak since the process started.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # macOS bytes, Linux KiB


def reset_peak_memory() -> bool:
    """Start a new peak: CUDA's always, the process's where Linux allows it.

    Writing 5 to ``/proc/self/clear_refs`` sets ``VmHWM`` back to the current resident size
    (Linux 4.0+), so a grid of runs in one process reports each run's own peak.

    Returns:
        Whether the resident-memory peak was reset (False: it still counts from process start).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (GiB), and peak CUDA allocation when CUDA was used."""
    out = {"peak_rss_gib": peak_rss_gib()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def layer_rows(records: list[LayerRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        row = asdict(r)
        row["shape"] = list(r.shape)
        row["loss_ratio"] = r.loss_ratio
        row["level_histogram"] = {str(k): v for k, v in sorted(r.level_histogram.items())}
        rows.append(row)
    return rows


def weighted_nominal_bits(records: list[LayerRecord]) -> float:
    """Recompute the model's nominal rate from the per-layer level histograms."""
    bits = weights = 0.0
    for r in records:
        rows = r.shape[0]
        for levels, count in r.level_histogram.items():
            bits += math.log2(int(levels)) * count * rows
            weights += count * rows
    return bits / weights if weights else 0.0


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``, a tied one once (meta tensors of a lazy model count too)."""
    return sum(p.numel() for p in model.parameters())


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (:mod:`baq.atomic`: a temp file beside the target, fsync, rename;
    a link, FIFO or device at ``path`` is refused)."""
    return atomic.write_json(path, obj, default=_jsonable)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write a safetensors file atomically (:mod:`baq.atomic`)."""
    return atomic.write_safetensors(path, tensors, metadata)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: perplexity before and after, bits, seconds."""
    q = report["quant"]
    lines = [
        f"method {q['method']}  target {q['bits']:g} bits  achieved {report['nominal_bits']:.4f} "
        f"nominal bits  ({report['quantized_layers']} layers, {report['quantized_weights']:,} "
        "weights)",
        f"quantization {report['seconds']['quantize']:.1f} s"
        + (
            f" (after a {report['seconds']['measure']:.1f} s measurement)"
            if "measure" in report["seconds"]
            else ""
        ),
    ]
    ppl = report.get("perplexity") or {}
    for name, v in ppl.items():
        before, after = v.get("before"), v.get("after")
        if before is not None and after is not None:
            lines.append(f"perplexity {name}: {before:.3f} -> {after:.3f}  (x{after / before:.2f})")
        elif after is not None:
            lines.append(f"perplexity {name}: {after:.3f}")
        kl = (report.get("divergence") or {}).get(name)
        if kl:
            lines.append(
                f"KL divergence {name}: {kl['kl_mean']:.5f} ± {kl['kl_mean_stderr']:.5f}, same "
                f"top token {100 * kl['kl_top_token_agreement']:.2f} %"
            )
    return "\n".join(lines)


def build_report(
    *,
    model: str,
    quant: dict[str, Any],
    calib: dict[str, Any],
    records: list[LayerRecord],
    seconds: dict[str, float],
    perplexity: dict[str, dict[str, float | None]],
    storage_bits: float | None = None,
    divergence: dict[str, dict[str, float]] | None = None,
    memory_plan: dict[str, Any] | None = None,
    folder_bytes: int | None = None,
    parameters: int | None = None,
) -> dict[str, Any]:
    """The run report: settings, headline numbers, and one row per quantized layer.

    ``folder_bytes`` (the saved folder's files, all of them) and ``parameters`` (every parameter
    of the model, tied ones once) give ``folder_bits_per_parameter``, the whole model's rate
    beside ``storage_bits``, which counts the quantized linears only.

    ``divergence`` maps each evaluation set to its KL statistics against the model before
    quantization (:mod:`baq.eval.divergence`, compact base with the top tokens per position).
    ``memory_plan`` (:meth:`baq.run.memory_estimate.MemoryPlan.as_dict`) goes under
    ``memory.plan``, its
    estimated peak beside the measured one as ``memory.estimated_peak_gib``.
    """
    memory = peak_memory()
    if memory_plan is not None:
        memory["estimated_peak_gib"] = memory_plan["estimated_peak_gib"]
        memory["plan"] = memory_plan
    return {
        "report_version": REPORT_VERSION,
        "model": model,
        "quant": quant,
        "calib": calib,
        "nominal_bits": weighted_nominal_bits(records),
        "storage_bits": storage_bits,
        "folder_bytes": folder_bytes,
        "parameters": parameters,
        "folder_bits_per_parameter": (
            None if folder_bytes is None or not parameters else folder_bytes * 8 / parameters
        ),
        "quantized_layers": len(records),
        "quantized_weights": sum(r.shape[0] * r.shape[1] for r in records),
        "perplexity": perplexity,
        "divergence": divergence or {},
        "seconds": seconds,
        "memory": memory,
        "environment": environment(),
        "layers": layer_rows(records),
    }

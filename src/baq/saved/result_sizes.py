"""What a solver result will take in a saved folder, from its level counts alone (no packing):
its bytes, its entry in the ``layers`` metadata, and the storage and nominal rates of a run."""

from __future__ import annotations

import torch

from baq.quant.gptq import QuantResult
from baq.saved.packing import layer_nbytes, range_dtype, range_groups
from baq.saved.rotation_meta import ROTATION_BYTES


def layer_meta(shape: tuple[int, int], group_size: int | None, sym: bool, dim: str) -> dict:
    """A layer's entry in the ``layers`` metadata of quantized.safetensors (docs/FORMAT.md)."""
    meta = {"shape": [int(shape[0]), int(shape[1])], "group_size": group_size, "sym": sym}
    if dim != "oc":  # absent means per-OC, as in every version 1 file
        meta["dim"] = dim
    return meta


def result_nbytes(res: QuantResult) -> int:
    """Bytes the saved tensors of one solver result take, from its level counts (no packing)."""
    rows, cols = res.codes.shape
    ngroups = range_groups((rows, cols), res.grid.group_size, res.grid.dim)
    range_bytes = range_dtype(res.grid.lo, res.grid.hi).itemsize
    nbytes = layer_nbytes(rows, ngroups, res.levels, range_bytes, res.grid.dim)
    return nbytes + (0 if res.rotation is None else ROTATION_BYTES)


def storage_bits_of(results: dict[str, QuantResult]) -> float:
    """Storage rate a save of ``results`` will have, from the level counts alone (no packing).

    Args:
        results: full module name -> solver result.
    Returns:
        Bytes of the stored quantized-layer tensors times 8, over the quantized weights (the
        number :func:`storage_bits` reads back from the saved folder); 0 for no results.
    """
    nbytes = weights = 0
    for res in results.values():
        nbytes += result_nbytes(res)
        weights += res.codes.numel()
    return nbytes * 8 / weights if weights else 0.0


def nominal_bits_of(results: dict[str, QuantResult]) -> float:
    bits = weights = 0.0
    for res in results.values():
        rows, cols = res.codes.shape
        bits += rows * float(torch.log2(res.levels.double()).sum())
        weights += rows * cols
    return bits / weights if weights else 0.0

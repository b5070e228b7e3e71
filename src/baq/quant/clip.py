"""Clipped grid ranges: each per-OC range shrunk towards 0 where that rounds the row better.

A min/max range is set by a row's one or two largest weights; at 2 to 4 bits its steps are then
coarse for all the others. Shrinking the range by a factor ``s <= 1`` clips those few weights and
refines every other one. Per row (and column group) this picks, among the candidates
``s in CLIP_SHRINKS`` (``s = 1``, the min/max range, among them, so the search never does worse by
its own measure), the one that minimises the rounding error weighted by the Hessian diagonal,

    e_r(s) = sum_j H_jj (w_rj - q_{L_j}(w_rj; s lo_r, s hi_r))^2,

the proxy loss ``tr(dW H dW^T)`` of DESIGN.md section 1 without its off-diagonal terms (which the
GPTQ solve then answers by error feedback), at the columns' own level counts ``L_j``. It is the
weighted form of the MSE range search of GPTQ's published quantizer and of llama.cpp's k-quants'
scale search (their idea, our code). The shrunk ranges still contain 0 and are rounded outward to
the stored range dtype, so the file holds exactly what was searched.

Per-IC grids are refitted column by column inside the solve and are not clipped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import Grid, column_params, dequantize_codes, quantize_codes, to_half_outward

# candidate shrink factors, 1.0 first (ties keep the min/max range)
CLIP_SHRINKS: tuple[float, ...] = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


def shrink_grid(grid: Grid, s: Tensor, range_dtype: str = "float16") -> Grid:
    """``grid`` with every range scaled by its factor ``s`` (same shape as ``grid.lo``),
    rounded outward to float16 when ``range_dtype`` is ``"float16"``."""
    lo, hi = grid.lo * s, grid.hi * s
    if range_dtype == "float16":
        lo, hi = to_half_outward(lo, down=True), to_half_outward(hi, down=False)
    empty = hi <= lo
    lo = torch.where(empty, grid.lo, lo)
    hi = torch.where(empty, grid.hi, hi)
    return Grid(lo=lo, hi=hi, group_size=grid.group_size, sym=grid.sym, dim=grid.dim)


def range_errors(W: Tensor, grid: Grid, levels: Tensor, weight: Tensor) -> Tensor:
    """(rows, ngroups) weighted rounding error ``sum_j weight_j (w - q(w))^2`` of each range."""
    step, zero = column_params(grid, levels)
    Q = dequantize_codes(quantize_codes(W, step, zero, levels), step, zero)
    err = (Q - W).square() * weight.to(W.device, torch.float32).unsqueeze(0)
    ngroups = grid.lo.shape[1]
    if ngroups == 1:
        return err.sum(dim=1, keepdim=True)
    g = torch.arange(W.shape[1], device=W.device) // grid.group_size
    out = torch.zeros(W.shape[0], ngroups, device=W.device)
    return out.index_add_(1, g, err)


def clip_grid(
    W: Tensor,
    grid: Grid,
    levels: Tensor,
    weight: Tensor | None = None,
    range_dtype: str = "float16",
    shrinks: tuple[float, ...] = CLIP_SHRINKS,
) -> tuple[Grid, Tensor]:
    """The per-OC grid whose every range is the best of ``shrinks`` times the fitted one.

    Args:
        W: (rows, cols) float32 weights the grid was fitted on.
        grid: its min/max per-OC grid (:func:`~baq.quant.grid.fit_grid`).
        levels: (cols,) level counts the ranges are searched at.
        weight: (cols,) non-negative column weights, the Hessian diagonal ``H_jj``; None: 1.
        range_dtype: the grid's range dtype (the candidates are rounded outward to it).
        shrinks: the candidate factors; the first should be 1.0.
    Returns:
        ``(grid, s)``: the clipped grid and the (rows, ngroups) chosen factors.
    """
    if grid.dim != "oc":
        raise ValueError("clip_grid: per-IC ranges are fitted inside the solve; use a per-OC grid")
    W = W.float()
    weight = torch.ones(W.shape[1], device=W.device) if weight is None else weight.clamp(min=0)
    best_err = best_s = None
    for factor in shrinks:
        s = torch.full_like(grid.lo, factor)
        err = range_errors(W, shrink_grid(grid, s, range_dtype), levels, weight)
        if best_err is None:
            best_err, best_s = err, s
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    assert best_s is not None, "shrinks is empty"
    return shrink_grid(grid, best_s, range_dtype), best_s

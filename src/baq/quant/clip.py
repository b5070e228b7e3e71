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
# weights per slab of rows searched together: each candidate's rounding makes a few temporaries
# of the slab's size, which stay in cache and in the heap (a whole 8192 x 28672 layer made
# 940 MB ones, fresh pages each time: a 70B block spent more CPU seconds in the clip search than
# in its solves). 2048 x 8192, one thread: 19.4 s whole, 10.4 at 2^20 weights a slab, 6.4 at
# 2^18, 6.7 at 2^16 (no page faults left), 9.9 at 2^14 (per-slab overhead)
SLAB_WEIGHTS = 1 << 17


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
    slab_weights: int = SLAB_WEIGHTS,
) -> tuple[Grid, Tensor]:
    """The per-OC grid whose every range is the best of ``shrinks`` times the fitted one.

    Args:
        W: (rows, cols) float32 weights the grid was fitted on.
        grid: its min/max per-OC grid (:func:`~baq.quant.grid.fit_grid`).
        levels: (cols,) level counts the ranges are searched at.
        weight: (cols,) non-negative column weights, the Hessian diagonal ``H_jj``; None: 1.
        range_dtype: the grid's range dtype (the candidates are rounded outward to it).
        shrinks: the candidate factors; the first should be 1.0.
        slab_weights: weights searched at once (rows in slabs of about this many; the result
            does not depend on it).
    Returns:
        ``(grid, s)``: the clipped grid and the (rows, ngroups) chosen factors.
    """
    if grid.dim != "oc":
        raise ValueError("clip_grid: per-IC ranges are fitted inside the solve; use a per-OC grid")
    if not shrinks:
        raise ValueError("clip_grid: no candidate shrink factors")
    W = W.float()
    weight = torch.ones(W.shape[1], device=W.device) if weight is None else weight.clamp(min=0)
    rows = W.shape[0]
    slab = max(1, slab_weights // max(1, W.shape[1]))
    chosen = []
    for r0 in range(0, rows, slab):  # rows are independent: the same choice, slab by slab
        part = Grid(grid.lo[r0 : r0 + slab], grid.hi[r0 : r0 + slab], grid.group_size,
                    grid.sym, grid.dim)  # fmt: skip
        chosen.append(_best_shrinks(W[r0 : r0 + slab], part, levels, weight, range_dtype, shrinks))
    best_s = torch.cat(chosen)
    return shrink_grid(grid, best_s, range_dtype), best_s


def _best_shrinks(
    W: Tensor,
    grid: Grid,
    levels: Tensor,
    weight: Tensor,
    range_dtype: str,
    shrinks: tuple[float, ...],
) -> Tensor:
    """(rows, ngroups) factor of ``shrinks`` with the smallest weighted error, per range."""
    best_err = best_s = None
    for factor in shrinks:
        s = torch.full_like(grid.lo, factor)
        err = range_errors(W, shrink_grid(grid, s, range_dtype), levels, weight)
        if best_err is None or best_s is None:
            best_err, best_s = err, s
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    assert best_s is not None
    return best_s

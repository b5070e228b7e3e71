"""Uniform quantization grids with a level count per column (DESIGN.md section 1, "grid").

A grid is one range ``[lo, hi]`` per row, or per row and group of ``group_size`` columns
(``dim="oc"``, per output channel); or one range per column, or per column and group of
``group_size`` consecutive rows (``dim="ic"``, per input channel: Heo et al., ICLR 2024, whose
per-IC groups isolate the input channels that activation outliers make important). The range
always contains 0. Column ``j`` with ``L_j`` levels uses

    step_j = (hi - lo) / (L_j - 1),   zero_j = round(-lo / step_j),   codes in [0, L_j - 1],

so a per-OC row range is shared by all its columns while each column has its own resolution; a
per-IC column has its own range(s) and its own resolution. Symmetric
grids use ``lo = -hi`` and the fixed zero point ``L_j // 2``. ``L_j = 1`` stores no code at all and
dequantizes to 0: the column is pruned (0 lies in every range, so it is always representable).

By default the range is rounded (outward) to float16 when the grid is built, because the packed
format stores it in float16: what the solver quantizes against is then exactly what a reader of the
file reconstructs. ``range_dtype="float32"`` keeps the float32 min/max, as GPTQ's and BAQ's
published code do (RTN then reproduces their perplexities exactly); the file stores such ranges in
float32, 0.047 bits per weight more on the reference model.
Round-to-nearest (RTN) is :func:`quantize` applied directly to the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import RANGE_DTYPES


@dataclass(frozen=True)
class Grid:
    """Per-row (or per-row-and-group) ranges, or per-column (or per-column-and-group) ones.

    Attributes:
        lo: (rows, ngroups) float32 for ``dim="oc"``, (ngroups, cols) for ``dim="ic"``; <= 0
            (float16-representable unless fitted in float32).
        hi: same shape, >= 0, hi > lo (likewise).
        group_size: columns per group (``oc``) or rows per group (``ic``), or None for one range
            per row (``oc``) or per column (``ic``); ngroups == 1.
        sym: symmetric grid (lo == -hi, zero point L // 2).
        dim: ``"oc"`` (ranges along the output channel, a row's) or ``"ic"`` (a column's).
    """

    lo: Tensor
    hi: Tensor
    group_size: int | None
    sym: bool
    dim: str = "oc"


def group_of(cols: Tensor, group_size: int | None) -> Tensor:
    """Group index of each column index in ``cols``; a ragged last group is allowed."""
    return torch.zeros_like(cols) if group_size is None else cols // group_size


def fit_grid(
    W: Tensor,
    group_size: int | None = None,
    sym: bool = False,
    range_dtype: str = "float16",
    dim: str = "oc",
) -> Grid:
    """Fit the ranges of a grid to a weight matrix (min/max per row or row-group, 0 included).

    Args:
        W: (rows, cols) weights, any float dtype.
        group_size: columns per group (a ragged last group when it does not divide cols), or None;
            with ``dim="ic"`` rows per group.
        sym: symmetric range ``[-max|w|, max|w|]``.
        range_dtype: "float16": ranges rounded outward to float16 values (what the file stores);
            "float32": the exact min/max.
        dim: "oc": ranges per row (or row and column group); "ic": per column (or column and
            row group), i.e. the per-OC fit of ``W^T``, transposed.
    Returns:
        The :class:`Grid`; all-zero rows (columns) get the range [-1, 1] so every step is positive.
    """
    if dim == "ic":
        t = fit_grid(W.t(), group_size, sym, range_dtype)
        return Grid(t.lo.t().contiguous(), t.hi.t().contiguous(), t.group_size, sym, "ic")
    if dim != "oc":
        raise ValueError(f"dim={dim!r}: use oc or ic")
    W = W.float()
    rows, cols = W.shape
    if group_size is None or group_size >= cols:
        Wg = W.unsqueeze(1)  # (rows, 1, cols)
        gs = None if group_size is None else group_size
    else:
        ngroups = -(-cols // group_size)
        pad = ngroups * group_size - cols
        # pad with zeros: 0 is inside every range anyway, so padding changes no min or max
        Wg = torch.nn.functional.pad(W, (0, pad)).view(rows, ngroups, group_size)
        gs = group_size
    lo = Wg.amin(dim=2).clamp(max=0)
    hi = Wg.amax(dim=2).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    # what the file stores (float16) is what the solver uses; round outward so the range still
    # covers the weights, and give empty ranges the GPTQ convention [-1, 1]
    if range_dtype == "float16":
        lo = to_half_outward(lo, down=True)
        hi = to_half_outward(hi, down=False)
    elif range_dtype != "float32":
        raise ValueError(f"range_dtype={range_dtype!r}: use one of {', '.join(RANGE_DTYPES)}")
    empty = hi <= lo
    lo = torch.where(empty, torch.full_like(lo, -1.0), lo)
    hi = torch.where(empty, torch.full_like(hi, 1.0), hi)
    return Grid(lo=lo, hi=hi, group_size=gs, sym=sym)


def to_half_outward(x: Tensor, down: bool) -> Tensor:
    """Round float32 to the nearest float16 value on the outer side (towards -inf if ``down``)."""
    h = x.clamp(-65504.0, 65504.0).half().float()
    nudge = torch.nextafter(h.half(), torch.full_like(h.half(), -torch.inf if down else torch.inf))
    wrong_side = h > x if down else h < x
    return torch.where(wrong_side, nudge.float(), h)


def column_params(
    grid: Grid, levels: Tensor, cols: Tensor | None = None, rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Step and zero point of every (row, column) for the given level counts.

    Args:
        grid: the ranges.
        levels: (k,) int level counts L_j >= 1 of the selected columns.
        cols: (k,) indices of those columns in the weight matrix (default: 0..k-1).
        rows: the weight's row count; needed by per-IC grids with row groups only.
    Returns:
        step (rows, k) float32, with 1 where L_j == 1 (its only code 0 dequantizes to 0);
        zero (rows, k) float32 integer-valued zero points. A per-IC grid without row groups
        gives (1, k), which broadcasts over the rows.
    """
    if cols is None:
        cols = torch.arange(levels.numel(), device=levels.device)
    cols = cols.to(grid.lo.device)
    if grid.dim == "ic":
        lo = expand_rows(grid, grid.lo[:, cols], rows)
        hi = expand_rows(grid, grid.hi[:, cols], rows)
    else:
        g = group_of(cols, grid.group_size)
        lo, hi = grid.lo[:, g], grid.hi[:, g]  # (rows, k)
    L = levels.to(lo.device, torch.float32).unsqueeze(0)
    single = L <= 1
    step = torch.where(single, torch.ones_like(lo), (hi - lo) / (L - 1).clamp(min=1))
    if grid.sym:
        zero = torch.floor(L / 2).expand_as(step)
    else:
        zero = torch.round(-lo / step)
    zero = torch.where(single, torch.zeros_like(zero), zero)
    return step, zero


def expand_rows(grid: Grid, per_group: Tensor, rows: int | None) -> Tensor:
    """Per-IC (ngroups, k) values -> (rows, k): row r takes its row group's value.

    Without row groups the result is (1, k) and broadcasts over the rows. With groups the grid
    does not know where a ragged last group ends, so ``rows`` is required.
    """
    if grid.group_size is None:
        return per_group
    if rows is None:
        raise ValueError("a per-IC grid with row groups needs the row count")
    return per_group.repeat_interleave(grid.group_size, dim=0)[:rows]


def quantize_codes(W: Tensor, step: Tensor, zero: Tensor, levels: Tensor) -> Tensor:
    """Integer codes ``clamp(round(w / step) + zero, 0, L - 1)``.

    Args:
        W: (rows, k) weights; step, zero: (rows, k) from :func:`column_params`; levels: (k,).
    Returns:
        (rows, k) float32 integer-valued codes.
    """
    maxq = (levels.to(W.device, torch.float32) - 1).clamp(min=0).unsqueeze(0)
    q = torch.round(W.float() / step) + zero
    return torch.minimum(q.clamp(min=0), maxq)


def dequantize_codes(codes: Tensor, step: Tensor, zero: Tensor) -> Tensor:
    """Weights ``(codes - zero) * step`` (rows, k) float32."""
    return (codes.float() - zero) * step


def quantize(W: Tensor, grid: Grid, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Round-to-nearest onto the grid with per-column level counts.

    Args:
        W: (rows, cols) weights, any float dtype.
        grid: ranges from :func:`fit_grid`.
        levels: (cols,) int level counts, each >= 1.
    Returns:
        codes (rows, cols) int64 in [0, L_j - 1]; dequantized weights (rows, cols) float32.
    """
    step, zero = column_params(grid, levels, rows=W.shape[0])
    codes = quantize_codes(W, step, zero, levels)
    return codes.long(), dequantize_codes(codes, step, zero)


def dequantize(codes: Tensor, grid: Grid, levels: Tensor) -> Tensor:
    """Inverse of :func:`quantize`: (rows, cols) codes -> (rows, cols) float32 weights."""
    step, zero = column_params(grid, levels, rows=codes.shape[0])
    return dequantize_codes(codes, step, zero)


def uniform_levels(cols: int, bits: int, device: torch.device | None = None) -> Tensor:
    """(cols,) int64 level counts ``2**bits`` for a uniform grid (RTN, GPTQ)."""
    return torch.full((cols,), 2 ** int(bits), dtype=torch.int64, device=device)


def nominal_bits(levels: Tensor) -> float:
    """Nominal rate of a layer: mean over columns of log2 L_j (all columns have the same rows)."""
    return float(torch.log2(levels.double()).mean())

"""BAQ's bit allocation (Zhang, Wang, Lasaulce, Debbah, 2025; DESIGN.md section 1).

The layer loss is modelled as a function of the per-column bitwidths,

    loss(b) = sum_j c_j 2^(-2 b_j)                                  (BAQ loss model)

and minimised subject to the budget ``mean_j b_j = B``. The problem is convex; its Lagrange
conditions give the equal-loss solution ``c_j 2^(-2 b_j) = const``, i.e.

    b_j = B + (1/t) log2(c_j / geomean(c)),  t = 2                  (BAQ closed form)

whose loss over the uniform one is ``geomean(c) / mean(c) <= 1`` (AM-GM): the predicted gain.

Real grids need an integer number of levels per column, ``L_j = round(2^b_j)`` with
``1 <= L_j <= max_levels``; rounding and the clamp move the realised rate away from ``B``, so
:func:`allocate_levels` searches the constant of the closed form until the realised nominal rate
``mean_j log2 L_j`` meets the budget. :func:`allocate_integer_bits` solves the same problem over
powers of two (hardware-friendly kernels) exactly, by greedy marginal analysis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def closed_form_bits(sens: Tensor, avg_bits: float, exponent: float = 2.0) -> Tensor:
    """Continuous equal-loss allocation ``b_j = B + (1/t) log2(c_j / geomean(c))``.

    Args:
        sens: (cols,) sensitivities c_j > 0.
        avg_bits: budget B, the mean of the result.
        exponent: t (2 from the loss model; the published code uses 1.95).
    Returns:
        (cols,) float64 real bitwidths (may be negative for very insensitive columns).
    """
    logc = torch.log2(sens.double())
    return avg_bits + (logc - logc.mean()) / exponent


def predicted_gain(sens: Tensor) -> float:
    """Modelled optimal-over-uniform loss ratio ``geomean(c) / mean(c)`` over columns with c > 0."""
    c = sens.double()
    c = c[c > 0]
    if c.numel() == 0:
        return 1.0
    return float(torch.exp(torch.log(c).mean()) / c.mean())


def modelled_loss(sens: Tensor, levels: Tensor) -> float:
    """The loss model ``sum_j c_j 2^(-2 b_j)`` at ``b_j = log2 L_j``."""
    return float((sens.double() / levels.double().square()).sum())


def _levels_at(
    logc: Tensor, offset: float, exponent: float, max_levels: int, min_levels: int = 1
) -> Tensor:
    """``L_j = clamp(round(2^(offset + log2(c_j)/t)), min_levels, max_levels)``; c_j = 0 gives
    ``min_levels``."""
    b = offset + logc / exponent
    levels = torch.exp2(b).round().nan_to_num(float(min_levels))
    return levels.clamp(min_levels, max_levels).to(torch.int64)


def allocate_levels(
    sens: Tensor,
    avg_bits: float,
    exponent: float = 2.0,
    max_levels: int = 256,
    min_levels: int = 1,
) -> Tensor:
    """Level counts from the closed form with the budget met exactly.

    ``L_j(K) = round(2^(K + log2(c_j)/t))`` is nondecreasing in the constant ``K``; bisection finds
    the largest ``K`` whose nominal rate ``mean_j log2 L_j`` stays within ``B``, then the columns
    next in line (lowest threshold for their next level) get one more level while the budget
    allows. The rate then equals ``B`` up to one column's increment, never above it.

    Args:
        sens: (cols,) sensitivities c_j >= 0 (0: the column gets one level, i.e. is pruned).
        avg_bits: target nominal rate B in [0, log2(max_levels)].
        exponent: t in the closed form.
        max_levels: cap on L_j.
        min_levels: floor on L_j (the closed form with the clamp ``L_j >= min_levels``, whose
            Lagrange solution is the same threshold rule with the floor's columns fixed).
    Returns:
        (cols,) int64 level counts in [min_levels, max_levels].
    """
    _check_budget(avg_bits, max_levels, min_levels)
    c = sens.double().cpu()
    logc = torch.where(c > 0, torch.log2(c), torch.full_like(c, -math.inf))
    budget = avg_bits * c.numel()
    levels = _levels_for_budget(logc, None, budget, exponent, max_levels, min_levels)
    return levels.to(sens.device)


def _check_budget(avg_bits: float, max_levels: int, min_levels: int) -> None:
    if not 1 <= min_levels <= max_levels:
        raise ValueError(f"min_levels={min_levels}: use a value in [1, max_levels={max_levels}]")
    if not math.log2(min_levels) - 1e-12 <= avg_bits <= math.log2(max_levels) + 1e-12:
        raise ValueError(
            f"avg_bits={avg_bits} outside [log2(min_levels={min_levels}), "
            f"log2(max_levels={max_levels})]"
        )


def _levels_for_budget(
    logc: Tensor,
    cost: Tensor | None,
    budget: float,
    exponent: float,
    max_levels: int,
    min_levels: int = 1,
) -> Tensor:
    """``L_j = round(2^(K + logc_j / t))`` with the largest ``K`` whose spend fits ``budget``.

    The spend is ``sum_j cost_j log2 L_j`` (``cost`` None: every column costs 1). After the
    bisection, columns whose next rounding threshold comes first get one more level while the
    budget allows, so the spend is within one column's increment of the budget, never above it.
    """
    budget = budget + 1e-9 * max(1.0, abs(budget))  # slack for float sums

    def spend(levels: Tensor) -> float:
        bits = torch.log2(levels.double())
        return float(bits.sum() if cost is None else (cost * bits).sum())

    def at(offset: float) -> Tensor:
        return _levels_at(logc, offset, exponent, max_levels, min_levels)

    alive = logc[torch.isfinite(logc)]
    if alive.numel() == 0:
        return torch.full((logc.numel(),), min_levels, dtype=torch.int64)
    lo = math.log2(min_levels) - float(alive.max()) / exponent - 2.0  # every column at the floor
    hi = math.log2(max_levels) - float(alive.min()) / exponent + 2.0  # every live column capped
    if spend(at(hi)) <= budget:
        return at(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if spend(at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    levels = at(lo)

    # columns whose next rounding threshold lies in (lo, hi] (ties of equal c_j): add them in
    # threshold order while the budget lasts
    grow = (levels < max_levels) & torch.isfinite(logc)
    threshold = torch.log2(levels.double() + 0.5) - logc / exponent
    threshold = torch.where(grow, threshold, torch.full_like(threshold, math.inf))
    order = torch.argsort(threshold, stable=True)
    step = torch.log2((levels + 1).double() / levels.double())
    if cost is not None:
        step = step * cost
    room = budget - spend(levels)
    take = (torch.cumsum(step[order], 0) <= room) & torch.isfinite(threshold[order])
    levels[order[take]] += 1
    return levels


def _model_columns(
    sens: list[Tensor], beta: Tensor, rows: list[int]
) -> tuple[Tensor, Tensor, list[int]]:
    """All columns of all layers as one problem: ``log2(beta_l c_lj / rows_l)``, the cost
    ``rows_l`` of one bit of column ``j`` of layer ``l``, and each layer's column count."""
    if not (len(sens) == len(rows) == beta.numel()):
        raise ValueError(
            f"{len(sens)} layers of sensitivities, {len(rows)} row counts, "
            f"{beta.numel()} betas: one of each per layer"
        )
    logc, cost = [], []
    for c, b, r in zip(sens, beta.double().cpu(), rows):
        c = c.double().cpu()
        if not (b > 0 and math.isfinite(float(b))):
            raise ValueError(f"beta={float(b)}: every layer's importance must be > 0 and finite")
        weight = torch.where(c > 0, c * b / r, torch.zeros_like(c))
        logc.append(torch.where(weight > 0, torch.log2(weight), torch.full_like(c, -math.inf)))
        cost.append(torch.full_like(c, float(r)))
    return torch.cat(logc), torch.cat(cost), [c.numel() for c in sens]


def model_closed_form_bits(
    sens: list[Tensor], beta: Tensor, rows: list[int], avg_bits: float, exponent: float = 2.0
) -> list[Tensor]:
    """Continuous model-level allocation ``b_lj = K + (1/t) log2(beta_l c_lj / rows_l)``.

    Minimises the model's loss ``sum_l beta_l sum_j c_lj 2^(-t b_lj)`` subject to the budget in
    weights ``sum_l rows_l sum_j b_lj = B N`` (``N = sum_l rows_l cols_l``; DESIGN.md section 1,
    "Model-level allocation"): the Lagrange conditions ``t ln2 beta_l c_lj 2^(-t b_lj) =
    lambda rows_l`` give the form above, and ``K`` makes the weighted mean exactly ``B``.
    No clamps: bits may be negative. Equal ``beta`` and equal shapes give per-layer BAQ.

    Args:
        sens: per layer, (cols_l,) sensitivities c_lj > 0.
        beta: (layers,) importance of one unit of each layer's proxy loss, > 0.
        rows: per layer, its row count (output features).
        avg_bits: budget B in bits per weight.
        exponent: t.
    Returns:
        Per layer, (cols_l,) float64 bits.
    """
    logc, cost, cols = _model_columns(sens, beta, rows)
    if not torch.isfinite(logc).all():
        raise ValueError("model_closed_form_bits needs every c_lj > 0")
    # sum cost (K + logc / t) = B sum cost
    K = avg_bits - float((cost * logc).sum() / cost.sum()) / exponent
    return list(torch.split(K + logc / exponent, cols))


def allocate_model_levels(
    sens: list[Tensor],
    beta: Tensor,
    rows: list[int],
    avg_bits: float,
    exponent: float = 2.0,
    max_levels: int = 256,
    min_levels: int = 1,
) -> list[Tensor]:
    """Level counts of every column of every layer from the model-level closed form.

    ``L_lj = round(2^(K + (1/t) log2(beta_l c_lj / rows_l)))`` clamped to ``[1, max_levels]``,
    ``K`` searched so that the nominal rate over all quantized weights,
    ``sum_l rows_l sum_j log2 L_lj / N``, meets ``B`` within one column's step, never above.

    Args:
        sens, beta, rows, avg_bits, exponent: as in :func:`model_closed_form_bits`
            (``c_lj = 0``: the column gets one level).
        max_levels: cap on L_lj.
        min_levels: floor on L_lj (as in :func:`allocate_levels`).
    Returns:
        Per layer, (cols_l,) int64 level counts.
    """
    _check_budget(avg_bits, max_levels, min_levels)
    logc, cost, cols = _model_columns(sens, beta, rows)
    budget = avg_bits * float(cost.sum())
    levels = _levels_for_budget(logc, cost, budget, exponent, max_levels, min_levels)
    return list(torch.split(levels, cols))


def allocate_model_integer_bits(
    sens: list[Tensor],
    beta: Tensor,
    rows: list[int],
    avg_bits: float,
    max_bits: int = 8,
    min_bits: int = 0,
) -> list[Tensor]:
    """Power-of-two level counts for the model's loss under the budget in weights.

    Greedy marginal analysis: a bit more for column ``j`` of layer ``l`` lowers the modelled
    loss by ``beta_l c_lj (4^-b - 4^-(b+1))`` and costs ``rows_l`` stored bits; steps are taken
    by decreasing reduction per stored bit while they fit in ``floor(B N)``. Each column's
    ratios decrease with ``b``, so the steps taken are exactly those above a threshold: a
    Lagrangian solution, optimal for the bits it spends, which is within one step (``rows_l``
    bits) of the budget. With equal ``rows`` this is :func:`allocate_integer_bits`.

    ``min_bits``: every column's first bits are taken before any other step (a floor).

    Returns:
        Per layer, (cols_l,) int64 level counts ``2^b_lj``.
    """
    if not min_bits <= avg_bits <= max_bits:
        raise ValueError(f"avg_bits={avg_bits} outside [min_bits={min_bits}, max_bits={max_bits}]")
    logc, cost, cols = _model_columns(sens, beta, rows)
    weight = torch.exp2(logc)  # beta_l c_lj / rows_l: reduction per stored bit at 0 bits
    total = math.floor(avg_bits * float(cost.sum()) + 1e-9)
    k = torch.arange(max_bits, dtype=torch.float64)
    ratio = weight.unsqueeze(1) * (4.0**-k - 4.0 ** -(k + 1)).unsqueeze(0)  # (cols, max_bits)
    ratio[:, :min_bits] = math.inf  # the floor: first in line, a prefix of each column
    order = torch.argsort(-ratio.flatten(), stable=True)
    spent = torch.cumsum(cost.repeat_interleave(max_bits)[order], 0)
    fits = spent <= total
    # stop at the first step that does not fit: later, smaller steps would break the threshold
    n = int(fits.long().cumprod(0).sum())
    bits = torch.zeros(weight.numel() * max_bits, dtype=torch.int64)
    bits[order[:n]] = 1
    b = bits.view(-1, max_bits).sum(dim=1)
    return list(torch.split(2**b, cols))


def allocate_integer_bits(
    sens: Tensor, avg_bits: float, max_bits: int = 8, min_bits: int = 0
) -> Tensor:
    """Optimal power-of-two level counts for the modelled loss under the budget.

    Minimises ``sum_j c_j 4^(-b_j)`` over integers ``0 <= b_j <= max_bits`` with
    ``sum_j b_j <= floor(B * cols)``. The problem is separable and convex in each ``b_j``, so
    taking bits one at a time by largest marginal reduction ``c_j (4^-b - 4^-(b+1))`` is optimal;
    since each column's reductions decrease with ``b``, that greedy equals taking the
    ``floor(B * cols)`` largest entries of the (cols, max_bits) table of reductions.

    Args:
        sens: (cols,) sensitivities c_j >= 0.
        avg_bits: target mean bits B in [0, max_bits].
        max_bits: largest bitwidth of one column.
        min_bits: smallest (a floor every column gets before any other step).
    Returns:
        (cols,) int64 level counts ``2^b_j``.
    """
    if not min_bits <= avg_bits <= max_bits:
        raise ValueError(f"avg_bits={avg_bits} outside [min_bits={min_bits}, max_bits={max_bits}]")
    c = sens.double().cpu()
    cols = c.numel()
    total = int(math.floor(avg_bits * cols + 1e-9))
    k = torch.arange(max_bits, dtype=torch.float64)
    gains = c.unsqueeze(1) * (4.0**-k - 4.0 ** -(k + 1)).unsqueeze(0)  # (cols, max_bits)
    gains[:, :min_bits] = math.inf
    # stable order on a flattened (column, bit) table keeps each column's picks a prefix on ties
    flat = gains.flatten()
    order = torch.argsort(-flat, stable=True)[:total]
    bits = torch.zeros(cols * max_bits, dtype=torch.int64)
    bits[order] = 1
    b = bits.view(cols, max_bits).sum(dim=1)
    return (2**b).to(sens.device)


def uniform_sensitivity(losses: Tensor, bits: float) -> Tensor:
    """Measured sensitivities ``c_j = l_j 2^(2B)`` from a uniform solve at B bits (BAQ step 2).

    The scale does not change the allocation; it makes ``c_j`` the modelled loss at 0 bits.
    """
    return losses.double() * 4.0**bits


def analytic_sensitivity(ranges: Tensor, Udiag: Tensor) -> Tensor:
    """Sensitivities from the loss model alone, no uniform solve needed.

    A uniform quantizer with step ``range / 2^b`` has error variance ``step^2 / 12``; with
    GPTQ's weighting ``1 / U_jj^2`` the column's expected loss is
    ``2^(-2b) sum_r range_r^2 / (12 U_jj^2)``.

    Args:
        ranges: (rows, cols) grid range ``hi - lo`` seen by each column (per row or row-group).
        Udiag: (cols,) diagonal of the Cholesky factor of ``H^-1`` in the original column order.
    Returns:
        (cols,) float64 c_j.
    """
    return ranges.double().square().sum(dim=0) / (12.0 * Udiag.double().square())

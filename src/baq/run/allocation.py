"""Plans of the model-level allocation: a :class:`~baq.run.measure.Measurement` and a budget become
level counts for every column of every layer, in seconds, before anything is quantized.

The closed form is :func:`baq.quant.allocate.allocate_model_levels` (or its integer-bit greedy):
``b_lj = K + 1/2 log2(beta_l c_lj / rows_l)`` with ``K`` set by the budget in weights. The
modelled loss of a plan, ``sum_l beta_l sum_j c_lj / L_lj^2``, is in the estimator's units: for
the Fisher and noise estimators, a predicted KL divergence per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from baq.config import QuantConfig
from baq.quant import allocate
from baq.run.measure import Measurement


@dataclass
class LayerPlan:
    """One layer of a plan."""

    name: str
    shape: tuple[int, int]
    beta: float
    levels: Tensor  # (cols,) int64
    modelled_loss: float  # sum_j c_j / L_j^2 (the layer's loss model, without beta)

    @property
    def bits(self) -> float:
        return float(torch.log2(self.levels.double()).mean())


def plan_levels(meas: Measurement, cfg: QuantConfig) -> list[LayerPlan]:
    """Level counts of every measured layer at ``cfg.bits`` over the whole model.

    Args:
        meas: the measurement (sensitivities and ``beta`` of ``cfg.importance``).
        cfg: budget, ``integer_bits``, ``exponent``, ``max_levels``, ``importance``.
    Returns:
        One :class:`LayerPlan` per layer, in the measurement's order.
    """
    beta = meas.betas(cfg.importance)
    # a layer the estimator found no effect for would get no bits at all; floor it instead
    beta = beta.clamp(min=float(beta[beta > 0].min()) * 1e-3 if (beta > 0).any() else 1.0)
    sens = [meas.sens[n] for n in meas.names]
    rows = [s[0] for s in meas.shapes]
    if cfg.integer_bits:
        max_bits = int(math.floor(math.log2(cfg.max_levels)))
        min_bits = math.ceil(math.log2(cfg.min_levels))
        levels = allocate.allocate_model_integer_bits(
            sens, beta, rows, cfg.bits, max_bits, min_bits
        )
    else:
        levels = allocate.allocate_model_levels(
            sens, beta, rows, cfg.bits, cfg.exponent, cfg.max_levels, cfg.min_levels
        )
    return [
        LayerPlan(n, tuple(shape), float(b), L, allocate.modelled_loss(meas.sens[n], L))
        for n, shape, b, L in zip(meas.names, meas.shapes, beta, levels)
    ]


def plan_bits(plans: list[LayerPlan]) -> float:
    """Nominal rate of a plan over all its weights."""
    weights = sum(p.shape[0] * p.shape[1] for p in plans)
    return sum(p.bits * p.shape[0] * p.shape[1] for p in plans) / weights


def modelled_loss(plans: list[LayerPlan]) -> float:
    """``sum_l beta_l sum_j c_lj / L_lj^2``: the plan's modelled model loss."""
    return sum(p.beta * p.modelled_loss for p in plans)


def format_plan(
    plans: list[LayerPlan], budgets: list[float], meas: Measurement, cfg: QuantConfig
) -> str:
    """The ``baq plan`` table: bits per layer, then the modelled loss at a few budgets."""
    from dataclasses import replace

    width = max(len(p.name) for p in plans)
    lines = [f"{'layer':<{width}}  {'shape':>11}  {'beta':>9}  bits  levels (min..max)"]
    for p in plans:
        lines.append(
            f"{p.name:<{width}}  {f'{p.shape[0]}x{p.shape[1]}':>11}  {p.beta:9.3e}  "
            f"{p.bits:4.2f}  {int(p.levels.min())}..{int(p.levels.max())}"
        )
    lines.append(
        f"{len(plans)} layers: {plan_bits(plans):.4f} nominal bits, modelled loss "
        f"{modelled_loss(plans):.4g} ({cfg.importance})"
    )
    for b in budgets:
        other = plan_levels(meas, replace(cfg, bits=b))
        lines.append(f"  at {b:g} bits: modelled loss {modelled_loss(other):.4g}")
    return "\n".join(lines)

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from baq.quant import allocate as A


def lognormal(cols: int, spread: float = 3.0) -> torch.Tensor:
    return torch.exp(spread * torch.randn(cols, dtype=torch.float64))


@pytest.mark.parametrize("exponent", [2.0, 1.95])
def test_closed_form_matches_numerical_optimiser(exponent):
    # the published exponent 1/t corresponds to the loss model sum_j c_j 2^(-t b_j)
    c = lognormal(7, 1.5)
    B = 3.0
    b = A.closed_form_bits(c, B, exponent).numpy()

    cn = c.numpy()

    def loss(x):  # last column takes what the budget leaves: an unconstrained convex problem
        bb = np.append(x, B * len(cn) - x.sum())
        return float((cn * 2.0 ** (-exponent * bb)).sum())

    def grad(x):
        bb = np.append(x, B * len(cn) - x.sum())
        g = -exponent * math.log(2) * cn * 2.0 ** (-exponent * bb)
        return g[:-1] - g[-1]

    opt = minimize(loss, np.full(len(cn) - 1, B), jac=grad, method="BFGS", options={"gtol": 1e-14})
    b_opt = np.append(opt.x, B * len(cn) - opt.x.sum())
    assert np.abs(b - b_opt).max() < 1e-6


def test_closed_form_gives_equal_loss_and_meets_the_mean():
    c = lognormal(50)
    b = A.closed_form_bits(c, 2.5)
    per_column = c * 2.0 ** (-2 * b)
    assert torch.allclose(per_column, per_column.mean().expand(50), rtol=1e-9)
    assert abs(b.mean().item() - 2.5) < 1e-12


def test_predicted_gain_is_the_optimum_over_uniform():
    c = lognormal(30)
    B = 3.0
    b = A.closed_form_bits(c, B)
    optimum = (c * 2.0 ** (-2 * b)).sum()
    uniform = (c * 2.0 ** (-2 * B)).sum()
    assert abs(A.predicted_gain(c) - optimum / uniform) < 1e-9
    assert A.predicted_gain(c) < 1
    assert abs(A.predicted_gain(torch.full((9,), 0.3, dtype=torch.float64)) - 1) < 1e-12


@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0])
def test_identical_sensitivities_give_the_uniform_allocation(bits):
    levels = A.allocate_levels(torch.full((64,), 0.7), bits)
    assert (levels == 2 ** int(bits)).all()


@pytest.mark.parametrize("bits", [1.5, 2.0, 2.5, 3.0, 4.0, 6.0])
@pytest.mark.parametrize("cols", [37, 576, 1536])
def test_budget_is_met_within_one_column(bits, cols):
    c = lognormal(cols)
    c[:3] = 0  # dead columns
    levels = A.allocate_levels(c, bits, max_levels=256)
    assert levels.min() >= 1 and levels.max() <= 256
    assert (levels[:3] == 1).all()
    rate = torch.log2(levels.double()).mean().item()
    assert rate <= bits + 1e-9
    # the cheapest single-level increment among columns that could still grow bounds the gap
    grow = levels < 256
    step = torch.log2((levels[grow] + 1).double() / levels[grow].double()).max().item()
    assert bits - rate <= step / cols + 1e-9


def test_allocation_follows_the_closed_form_and_beats_uniform():
    c = lognormal(400, 2.0)
    levels = A.allocate_levels(c, 3.0)
    b = torch.log2(levels.double())
    # sensitive columns get more bits: the allocation is monotone in c
    order = torch.argsort(c)
    assert (torch.diff(levels[order]) >= 0).all()
    # and close to the continuous optimum where it is not clamped
    cont = A.closed_form_bits(c, 3.0)
    free = (levels > 1) & (levels < 256)
    assert (b[free] - cont[free]).abs().median() < 0.2
    assert A.modelled_loss(c, levels) < A.modelled_loss(c, torch.full_like(levels, 8))


def brute_force_integer(c, B, max_bits):
    best, best_b = math.inf, None
    for bs in itertools.product(range(max_bits + 1), repeat=len(c)):
        if sum(bs) <= math.floor(B * len(c) + 1e-9):
            loss = sum(ci * 4.0**-bi for ci, bi in zip(c, bs))
            if loss < best - 1e-15:
                best, best_b = loss, bs
    return best, best_b


@pytest.mark.parametrize("trial", range(6))
def test_integer_bits_equal_brute_force(trial):
    g = torch.Generator().manual_seed(trial)
    cols = 4 if trial % 2 else 5
    c = torch.exp(3 * torch.randn(cols, generator=g, dtype=torch.float64))
    B = [1.0, 2.0, 2.5, 3.0, 1.6, 0.5][trial]
    levels = A.allocate_integer_bits(c, B, max_bits=4)
    bits = torch.log2(levels.double())
    assert torch.equal(2 ** bits.round().long(), levels)
    best, _ = brute_force_integer(c.tolist(), B, 4)
    assert abs(A.modelled_loss(c, levels) - best) <= 1e-12 * max(best, 1)


def test_integer_bits_with_equal_sensitivities_is_uniform():
    levels = A.allocate_integer_bits(torch.ones(32, dtype=torch.float64), 3.0)
    assert (levels == 8).all()


def test_analytic_sensitivity_is_the_expected_rtn_loss():
    # E[(w - q)^2] = step^2 / 12 for a uniform quantizer on smooth data, weighted by 1 / U_jj^2 / 2
    rows, cols, bits = 4000, 3, 4
    ranges = torch.rand(rows, cols) + 0.5
    Udiag = torch.tensor([0.5, 1.0, 2.0])
    step = ranges / 2**bits
    err = (torch.rand(rows, cols) - 0.5) * step  # uniform rounding error
    measured = (err.double() ** 2).sum(0) / Udiag.double() ** 2
    modelled = A.analytic_sensitivity(ranges, Udiag) * 2.0 ** (-2 * bits)
    assert torch.allclose(measured, modelled, rtol=0.1)


# ----------------------------------------------------------------------------- a floor on levels


@pytest.mark.parametrize("trial", range(4))
def test_a_floor_of_min_levels_is_the_closed_form_clamped_from_below(trial):
    """With ``min_levels`` every column gets at least the floor, the budget is met as without
    it, and the columns above the floor follow the same threshold rule: the allocation equals
    the unfloored one on a problem where the floor is not binding, and where it binds, a
    column's levels never fall when its sensitivity rises (monotone), and the columns above the
    floor have the equal-loss shape (``c_j / L_j^2`` equal within rounding)."""
    g = torch.Generator().manual_seed(trial)
    c = torch.exp(3 * torch.randn(64, generator=g, dtype=torch.float64))
    B = [1.5, 2.0, 3.0, 2.5][trial]
    free = A.allocate_levels(c, B)
    floored = A.allocate_levels(c, B, min_levels=2)
    assert int(floored.min()) >= 2 and int(free.min()) == 1  # lognormal spread 3: some pruned
    bits = float(torch.log2(floored.double()).sum())
    assert bits <= B * 64 + 1e-9 and B * 64 - bits < math.log2(3)  # within one column's step
    order = torch.argsort(c)
    assert bool((floored[order][1:] >= floored[order][:-1]).all())
    above = floored > 2
    loss = c[above] / floored[above].double() ** 2
    # a rounded level L is within [L - 1/2, L + 1/2] of the continuous one: loss within (3/2)^2
    assert float(loss.max() / loss.min()) < (1.5 / 0.5) ** 2
    # not binding: a floor of 1, or a problem where nobody is pruned, gives the same levels
    assert torch.equal(A.allocate_levels(c, B, min_levels=1), free)
    flat = torch.ones(64, dtype=torch.float64) + 0.01 * torch.rand(64, generator=g)
    assert torch.equal(A.allocate_levels(flat, 3.0, min_levels=2), A.allocate_levels(flat, 3.0))


@pytest.mark.parametrize("trial", range(4))
def test_integer_bits_with_a_floor_equal_brute_force_over_floored_bits(trial):
    g = torch.Generator().manual_seed(trial)
    c = torch.exp(3 * torch.randn(4, generator=g, dtype=torch.float64))
    B = [1.0, 2.0, 2.5, 1.5][trial]
    levels = A.allocate_integer_bits(c, B, max_bits=4, min_bits=1)
    assert int(levels.min()) >= 2
    best = math.inf
    for bs in itertools.product(range(1, 5), repeat=4):
        if sum(bs) <= math.floor(B * 4 + 1e-9):
            best = min(best, sum(ci * 4.0**-bi for ci, bi in zip(c.tolist(), bs)))
    assert abs(A.modelled_loss(c, levels) - best) <= 1e-12 * max(best, 1)


def test_a_budget_below_the_floor_is_refused():
    with pytest.raises(ValueError, match="min_levels"):
        A.allocate_levels(torch.ones(4, dtype=torch.float64), 0.5, min_levels=2)
    with pytest.raises(ValueError, match="min_levels"):
        A.allocate_levels(torch.ones(4, dtype=torch.float64), 3.0, min_levels=300)

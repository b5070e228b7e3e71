"""Model-level allocation (one budget over every column of every layer) against slow references."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from baq.quant import allocate as A


def problem(layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = [int(n) for n in torch.randint(3, 9, (layers,), generator=g)]
    rows = [int(n) for n in torch.randint(2, 40, (layers,), generator=g)]
    sens = [torch.exp(2 * torch.randn(c, generator=g, dtype=torch.float64)) for c in cols]
    beta = torch.exp(3 * torch.randn(layers, generator=g, dtype=torch.float64))
    return sens, beta, rows


def model_loss(sens, beta, bits, t=2.0):
    return sum(float(b * (c * 2.0 ** (-t * x)).sum()) for c, b, x in zip(sens, beta, bits))


@pytest.mark.parametrize("seed", range(3))
def test_continuous_allocation_equals_a_numerical_optimiser(seed):
    sens, beta, rows = problem(seed=seed)
    B = 3.0
    got = torch.cat(A.model_closed_form_bits(sens, beta, rows, B)).numpy()
    c = torch.cat([s * b for s, b in zip(sens, beta)]).numpy()
    w = np.concatenate([np.full(s.numel(), r, dtype=float) for s, r in zip(sens, rows)])
    budget = B * w.sum()
    opt = minimize(
        lambda x: float((c * 2.0 ** (-2 * x)).sum()),
        np.full(len(c), B),
        jac=lambda x: -2 * math.log(2) * c * 2.0 ** (-2 * x),
        constraints=[{"type": "eq", "fun": lambda x: w @ x - budget, "jac": lambda x: w}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert opt.success
    assert np.abs(got - opt.x).max() < 1e-4
    assert w @ got == pytest.approx(budget)


def test_one_layer_and_equal_geomean_layers_reduce_to_per_layer_baq():
    c = torch.exp(2 * torch.randn(40, dtype=torch.float64))
    one = A.allocate_model_levels([c], torch.ones(1), [16], 2.7)
    assert torch.equal(one[0], A.allocate_levels(c, 2.7))
    # layers whose columns are permutations of each other have one geomean: the pooled
    # closed form then gives every layer the per-layer solution
    layers = [c[torch.randperm(40)] for _ in range(3)]
    cont = A.model_closed_form_bits(layers, torch.ones(3), [16, 16, 16], 2.7)
    for x, layer in zip(cont, layers):
        torch.testing.assert_close(x, A.closed_form_bits(layer, 2.7))
    ints = A.allocate_model_integer_bits(layers, torch.ones(3), [16, 16, 16], 3)
    for x, layer in zip(ints, layers):
        assert torch.equal(x, A.allocate_integer_bits(layer, 3))


def test_a_hundred_times_more_important_layer_gets_half_log2_100_more_bits():
    c = torch.exp(torch.randn(30, dtype=torch.float64))
    bits = A.model_closed_form_bits([c, c], torch.tensor([1.0, 100.0]), [8, 8], 3.0)
    torch.testing.assert_close(
        bits[1] - bits[0], torch.full((30,), 0.5 * math.log2(100), dtype=torch.float64)
    )


@pytest.mark.parametrize("B", [1.3, 2.0, 2.5, 3.7])
def test_levels_meet_the_budget_in_weights_within_one_step(B):
    sens, beta, rows = problem(layers=5, seed=4)
    levels = A.allocate_model_levels(sens, beta, rows, B)
    N = sum(r * c.numel() for r, c in zip(rows, sens))
    spent = sum(r * float(torch.log2(L.double()).sum()) for r, L in zip(rows, levels))
    assert spent <= B * N + 1e-6
    # one more level of any column still below the cap would overspend... or be the next in
    # line: the shortfall is below the largest single step
    step = max(r * math.log2(3 / 2) for r in rows)  # largest step from 2 levels upwards
    step = max(step, max(rows))  # or from 1 to 2 levels
    assert B * N - spent < step
    for L in levels:
        assert L.min() >= 1 and L.max() <= 256


def brute_force(sens, beta, rows, spend, max_bits):
    """Best integer bits whose stored bits are at most ``spend`` (every combination)."""
    cols = [(c, b, r) for s, b, r in zip(sens, beta, rows) for c in s]
    best = math.inf
    for bits in itertools.product(range(max_bits + 1), repeat=len(cols)):
        if sum(r * x for (_, _, r), x in zip(cols, bits)) <= spend:
            best = min(best, sum(float(b * c) * 4.0**-x for (c, b, _), x in zip(cols, bits)))
    return best


@pytest.mark.parametrize("trial", range(4))
def test_integer_bits_are_optimal_for_the_bits_they_spend(trial):
    g = torch.Generator().manual_seed(trial)
    sens = [torch.exp(2 * torch.randn(3, generator=g, dtype=torch.float64)) for _ in range(2)]
    beta = torch.exp(torch.randn(2, generator=g, dtype=torch.float64))
    rows = [1, 3]
    B = 1.0 + trial * 0.4
    levels = A.allocate_model_integer_bits(sens, beta, rows, B, max_bits=3)
    bits = [torch.log2(L.double()).round() for L in levels]
    spent = sum(r * float(b.sum()) for r, b in zip(rows, bits))
    N = sum(r * c.numel() for r, c in zip(rows, sens))
    assert spent <= math.floor(B * N) and math.floor(B * N) - spent < max(rows)
    got = model_loss(sens, beta, bits)
    assert got == pytest.approx(brute_force(sens, beta, rows, spent, 3), rel=1e-12)


def test_bad_inputs_are_refused():
    sens, beta, rows = problem()
    with pytest.raises(ValueError, match="one of each per layer"):
        A.allocate_model_levels(sens, beta, rows[:-1], 3)
    with pytest.raises(ValueError, match="beta"):
        A.allocate_model_levels(sens, torch.tensor([1.0, 0.0, 1.0]), rows, 3)


def test_a_floor_keeps_every_column_of_every_layer_and_spends_the_budget():
    """The model-level closed form with ``min_levels=2``: no column pruned in any layer, the
    budget in weights met within one step, the same levels without the floor where it does
    not bind; the integer greedy's floor likewise (and it is optimal for what it spends)."""
    sens, beta, rows = problem(layers=5, seed=4)
    sens[0] = sens[0] * 1e-8  # a layer the unfloored plan starves
    N = sum(r * c.numel() for r, c in zip(rows, sens))
    free = A.allocate_model_levels(sens, beta, rows, 2.0)
    floored = A.allocate_model_levels(sens, beta, rows, 2.0, min_levels=2)
    assert float(torch.log2(free[0].double()).mean()) < 0.5
    assert all(int(L.min()) >= 2 for L in floored)
    spent = sum(r * float(torch.log2(L.double()).sum()) for r, L in zip(rows, floored))
    assert spent <= 2.0 * N + 1e-6 and 2.0 * N - spent < max(rows)
    for L in A.allocate_model_integer_bits(sens, beta, rows, 2.0, max_bits=8, min_bits=1):
        assert int(L.min()) >= 2


def test_rotation_floors_the_plan_at_two_levels_unless_told_otherwise():
    from baq.config import QuantConfig

    assert QuantConfig(rotate=True).min_levels == 2 and QuantConfig(rotate=False).min_levels == 1
    assert QuantConfig().min_levels == 2  # rotated by default
    assert QuantConfig(rotate=True, min_levels=1).min_levels == 1
    with pytest.raises(ValueError, match="below the floor"):
        QuantConfig(bits=1.0, min_levels=4)
    with pytest.raises(ValueError, match="min_levels"):
        QuantConfig(min_levels=0)


def test_integer_bits_in_the_config_are_recorded_as_the_command_line_records_them():
    from dataclasses import asdict

    from baq.config import QuantConfig

    assert asdict(QuantConfig(bits=3)) == asdict(QuantConfig(bits=3.0))
    assert isinstance(QuantConfig(bits=3).bits, float)

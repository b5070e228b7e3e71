"""Per-IC grids (Heo et al., ICLR 2024): the solver against a slow reference, RTN, AdaDim."""

import pytest
import torch
from slow_obq import slow_obq

from baq.config import QuantConfig
from baq.quant import grid as G
from baq.quant.adadim import choose_dim
from baq.quant.gptq import factor_hessian, gptq_solve, rtn_solve
from baq.quant.layer import column_sensitivity, quantize_layer


def correlated_hessian(cols: int, n: int = 400) -> torch.Tensor:
    """H = 2 X X^T / n of inputs driven by a few shared factors, scaled unevenly per channel."""
    X = torch.randn(cols, 3) @ torch.randn(3, n) + 0.5 * torch.randn(cols, n)
    X = X * (0.2 + 2 * torch.rand(cols, 1))
    return 2 * X @ X.t() / n


def slow_ranges(w, group_size, sym):
    """(G,) lo, hi of one column by explicit loops over its row groups (float32 ranges)."""
    rows = w.shape[0]
    gs = rows if group_size is None else group_size
    los, his = [], []
    for r0 in range(0, rows, gs):
        part = w[r0 : r0 + gs]
        lo, hi = min(0.0, float(part.min())), max(0.0, float(part.max()))
        if sym:
            hi = max(-lo, hi)
            lo = -hi
        if hi <= lo:
            lo, hi = -1.0, 1.0
        los.append(lo)
        his.append(hi)
    return torch.tensor(los), torch.tensor(his)


def slow_round(w, lo, hi, L, sym):
    """Round-to-nearest of one group of weights onto a range with L levels (DESIGN.md section 1)."""
    if L == 1:
        return torch.zeros_like(w)
    step = torch.tensor((hi - lo) / (L - 1), dtype=torch.float32)
    zero = torch.tensor(float(L // 2) if sym else round(-lo / float(step)), dtype=torch.float32)
    q = torch.clamp(torch.round(w.float() / step) + zero, 0, L - 1)
    return (q - zero) * step


def slow_gptq_ic(W, H, levels, group_size, sym, percdamp, act_order):
    """:func:`slow_obq` fitting each column's ranges on reach, on its values after feedback."""
    rows, cols = W.shape
    gs = rows if group_size is None else group_size
    ngroups = -(-rows // gs)
    lo_all, hi_all = torch.zeros(ngroups, cols), torch.zeros(ngroups, cols)

    def round_column(c, w):
        lo, hi = slow_ranges(w, group_size, sym)
        lo_all[:, c], hi_all[:, c] = lo, hi
        L = int(levels[c])
        parts = [w[g * gs : (g + 1) * gs] for g in range(ngroups)]
        return torch.cat(
            [slow_round(p, float(lo[g]), float(hi[g]), L, sym) for g, p in enumerate(parts)]
        )

    Q, _ = slow_obq(W, H, percdamp, act_order, round_column)
    return Q, lo_all, hi_all


CASES = [
    # rows, cols, block, row group, act_order, sym
    (16, 40, 128, None, False, False),
    (33, 70, 7, None, False, False),
    (33, 70, 16, 8, False, False),  # ragged last row group (33 = 4 * 8 + 1)
    (20, 67, 16, None, True, False),
    (21, 67, 16, 5, True, False),
    (24, 50, 1, 10, False, True),
]


@pytest.mark.parametrize(
    "rows,cols,block,group,act_order,sym",
    CASES,
    ids=["small", "block7", "groups-ragged", "act-order", "act-order-groups", "block1-sym"],
)
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed-levels"])
def test_ic_blocked_equals_column_by_column(rows, cols, block, group, act_order, sym, mixed):
    torch.manual_seed(rows * cols + block)
    W = torch.randn(rows, cols)
    H = correlated_hessian(cols)
    levels = torch.randint(1, 40, (cols,)) if mixed else G.uniform_levels(cols, 3)
    if sym:
        # with L even a symmetric range's end is exactly a rounding tie (hi / step = (L-1) / 2),
        # and ranges fitted on reach put a weight on it in every column: float64 and float32
        # feedback then round it apart; odd L has no tie at the ends
        levels = levels // 2 * 2 + 1
    f = factor_hessian(H, 0.01, act_order)
    res = gptq_solve(
        W, f, levels, block_size=block, group_size=group, sym=sym, dim="ic", range_dtype="float32"
    )
    Q, lo, hi = slow_gptq_ic(W, H, levels, group, sym, 0.01, act_order)
    rel = (res.weight.double() - Q).norm() / Q.norm()
    assert rel < 1e-4
    assert res.grid.dim == "ic" and res.grid.lo.shape == lo.shape
    assert torch.allclose(res.grid.lo, lo, rtol=1e-4, atol=1e-6)
    assert torch.allclose(res.grid.hi, hi, rtol=1e-4, atol=1e-6)
    # the stored ranges and codes reproduce the solver's weights exactly
    assert torch.equal(G.dequantize(res.codes, res.grid, res.levels), res.weight)


def test_ic_solve_rejects_a_fixed_grid():
    W, H = torch.randn(4, 6), correlated_hessian(6)
    f = factor_hessian(H)
    with pytest.raises(ValueError, match="grid=None"):
        gptq_solve(W, f, G.uniform_levels(6, 2), grid=G.fit_grid(W), dim="ic")


@pytest.mark.parametrize("group,sym", [(None, False), (7, False), (7, True), (100, False)])
@pytest.mark.parametrize("range_dtype", ["float16", "float32"])
def test_ic_rtn_codes_in_range_and_error_within_half_a_step(group, sym, range_dtype):
    torch.manual_seed(1)
    rows, cols = 30, 12
    W = torch.randn(rows, cols) * torch.rand(1, cols) * 3
    levels = torch.randint(2, 20, (cols,))
    res = rtn_solve(W, levels, group, sym, range_dtype, dim="ic")
    assert (res.codes >= 0).all() and (res.codes < levels.unsqueeze(0)).all()
    gs = rows if group is None or group >= rows else group
    for j in range(cols):
        L = int(levels[j])
        for g, r0 in enumerate(range(0, rows, gs)):
            part = W[r0 : r0 + gs, j]
            lo, hi = float(res.grid.lo[g, j]), float(res.grid.hi[g, j])
            assert lo <= min(0.0, float(part.min())) and hi >= max(0.0, float(part.max()))
            step = (hi - lo) / (L - 1)
            err = (part - res.weight[r0 : r0 + gs, j]).abs().max()
            assert err <= step / 2 * (1 + 1e-5)
            if range_dtype == "float32" and not sym:  # the exact min/max of the group
                assert lo == min(0.0, float(part.min())) and hi == max(0.0, float(part.max()))


def test_ic_analytic_sensitivity_sums_each_columns_own_row_groups():
    torch.manual_seed(2)
    rows, cols = 23, 10  # groups of 6 rows: 6, 6, 6, 5
    W, H = torch.randn(rows, cols), correlated_hessian(cols)
    cfg = QuantConfig(
        allocation="layer", method="baq", bits=3, group_size=6, dim="ic", sensitivity="analytic"
    )
    f = factor_hessian(H, cfg.percdamp)
    grid = G.fit_grid(W, 6, range_dtype="float16", dim="ic")
    sens, _ = column_sensitivity(W, f, grid, cfg)
    Udiag = torch.diagonal(f.U).double()
    for j in range(cols):
        total = 0.0
        for g, r0 in enumerate(range(0, rows, 6)):
            n = min(6, rows - r0)
            total += n * float(grid.hi[g, j] - grid.lo[g, j]) ** 2
        assert float(sens[j]) == pytest.approx(total / (12 * float(Udiag[j]) ** 2), rel=1e-6)


def outlier_input_layer(rows=64, cols=48, n=2048):
    """Inputs with a few outlier channels (x50) and their weights correspondingly small, as in
    LLMs: each output is x @ w with the outlier channels' large activations on small weights."""
    scale = torch.ones(cols)
    scale[[3, 17, 30]] = 50.0
    X = torch.randn(cols, n) * scale.unsqueeze(1)
    W = torch.randn(rows, cols) / scale.sqrt()
    return W, 2 * X @ X.t() / n


def outlier_row_layer(rows=64, cols=48, n=2048):
    """Well-behaved inputs; a few output rows with weights 20 times the others."""
    X = torch.randn(cols, n)
    W = torch.randn(rows, cols)
    W[[5, 40]] *= 20
    return W, 2 * X @ X.t() / n


@pytest.mark.parametrize(
    "layer,want", [(outlier_input_layer, "ic"), (outlier_row_layer, "oc")], ids=["in", "rows"]
)
def test_adadim_isolates_the_outliers(layer, want):
    torch.manual_seed(3)
    W, H = layer()
    dim, errors = choose_dim(W, H, G.uniform_levels(W.shape[1], 3))
    assert dim == want
    assert errors[want] < 0.8 * errors["ic" if want == "oc" else "oc"]  # not a near tie
    # the layer driver records the choice, and its result is on that grid
    for method in ("gptq", "baq"):
        res, rec = quantize_layer(
            # unrotated: a rotation spreads the outlier columns over every column
            W,
            H,
            QuantConfig(allocation="layer", method=method, bits=3, dim="auto", rotate=False),
        )
        assert rec.dim == want and res.grid.dim == want


def test_baq_on_ic_grids_meets_the_budget_and_beats_uniform_gptq_ic():
    torch.manual_seed(4)
    W, H = outlier_input_layer()
    W = W * (torch.rand(1, W.shape[1]) * 3)  # uneven column sensitivities
    g, _ = quantize_layer(W, H, QuantConfig(method="gptq", bits=3, dim="ic"))
    b, rec = quantize_layer(W, H, QuantConfig(allocation="layer", method="baq", bits=3, dim="ic"))
    assert rec.nominal_bits == pytest.approx(3.0, abs=0.02)  # integer level counts
    assert len(rec.level_histogram) > 1 and b.grid.dim == "ic"
    assert b.loss < g.loss

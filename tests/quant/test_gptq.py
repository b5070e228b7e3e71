import logging

import pytest
import torch
from slow_obq import slow_obq

from baq.quant import grid as G
from baq.quant.gptq import HessianError, factor_hessian, gptq_solve, proxy_loss, rtn_solve


def correlated_hessian(cols: int, n: int = 512, device="cpu") -> torch.Tensor:
    """H = 2 X X^T / n for inputs with shared factors and uneven scales, like activations."""
    mix = torch.randn(cols, cols // 4 + 1) @ torch.randn(cols // 4 + 1, n)
    X = (mix + 0.3 * torch.randn(cols, n)) * torch.rand(cols, 1) * 2
    return (2 * X @ X.t() / n).to(device)


def slow_gptq(W, H, levels, grid, percdamp, act_order):
    """:func:`slow_obq` on the per-row grid ``grid``, each column at its own level count."""

    def round_column(c, w):
        idx = torch.tensor([c])
        step, zero = G.column_params(grid, levels[idx], idx)
        codes = G.quantize_codes(w.unsqueeze(1), step, zero, levels[idx])
        return G.dequantize_codes(codes, step, zero)[:, 0]

    return slow_obq(W, H, percdamp, act_order, round_column)


CASES = [
    # rows, cols, block, group, act_order
    (16, 40, 128, None, False),
    (33, 130, 7, None, False),
    (33, 130, 32, 16, False),
    (20, 67, 16, None, True),
    (20, 67, 16, 10, True),
    (8, 50, 1, 13, False),
]


@pytest.mark.parametrize(
    "rows,cols,block,group,act_order",
    CASES,
    ids=["small", "block7", "groups16", "act-order", "act-order-groups", "block1-ragged-groups"],
)
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed-levels"])
def test_blocked_equals_column_by_column(rows, cols, block, group, act_order, mixed, device):
    W = torch.randn(rows, cols)
    H = correlated_hessian(cols)
    levels = torch.randint(1, 40, (cols,)) if mixed else G.uniform_levels(cols, 3)
    # float64 solve: in float32 a weight near a rounding boundary can round the other way in
    # the blocked and the column-by-column order, and the error feedback carries the flip on
    f = factor_hessian(H.double().to(device), 0.01, act_order)
    res = gptq_solve(
        W.double().to(device), f, levels.to(device), block_size=block, group_size=group
    )
    Q, losses = slow_gptq(W.double(), H.double(), levels, res.grid, 0.01, act_order)
    rel = (res.weight.cpu().double() - Q).norm() / Q.norm()
    assert rel < 1e-4
    assert torch.allclose(res.losses.cpu().double(), losses, rtol=1e-3, atol=1e-6)
    # codes and dequantized weights describe the same matrix
    deq = G.dequantize(res.codes, res.grid, res.levels)
    assert torch.equal(deq, res.weight)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_proxy_loss(bits):
    for _ in range(3):
        W = torch.randn(64, 96)
        H = correlated_hessian(96)
        levels = G.uniform_levels(96, bits)
        gptq = gptq_solve(W, factor_hessian(H), levels)
        rtn = rtn_solve(W, levels)
        assert proxy_loss(W, gptq.weight, H) < proxy_loss(W, rtn.weight, H)


def test_losses_add_up_to_the_proxy_loss():
    # sum_j l_j is the GPTQ objective: with H = 2XX^T/n it equals trace(D H D^T) / 2 up to damping
    W = torch.randn(32, 48)
    H = correlated_hessian(48, n=4096).double()
    res = gptq_solve(W, factor_hessian(H, percdamp=1e-6), G.uniform_levels(48, 3))
    assert abs(res.loss - proxy_loss(W, res.weight, H) / 2) / res.loss < 1e-2


def test_dead_inputs_zero_their_columns():
    W = torch.randn(10, 20)
    X = torch.randn(20, 100)
    X[[3, 11]] = 0
    H = 2 * X @ X.t() / 100
    f = factor_hessian(H)
    assert f.dead.nonzero().flatten().tolist() == [3, 11]
    res = gptq_solve(W, f, G.uniform_levels(20, 4))
    assert (res.weight[:, [3, 11]] == 0).all()
    assert (res.losses[[3, 11]] == 0).all()


def test_dampening_is_raised_until_cholesky_succeeds(caplog):
    # one slightly negative eigenvalue, as float rounding gives a nearly singular H
    Qm, _ = torch.linalg.qr(torch.randn(12, 12))
    H = Qm @ torch.diag(torch.tensor([1.0] * 11 + [-0.05])) @ Qm.t()
    # the logger itself: a CLI test run before may have set "baq" to errors only (-q)
    with caplog.at_level(logging.WARNING, logger="baq.quant.gptq"):
        f = factor_hessian(H, percdamp=0.01)
    assert f.percdamp > 0.01
    assert "not positive definite" in caplog.text
    Hd = H + f.percdamp * torch.diagonal(H).mean() * torch.eye(12)
    assert torch.linalg.eigvalsh(Hd).min() > 0


def test_hopeless_hessian_raises_a_clear_error():
    H = torch.eye(5)
    H[2, 2] = float("nan")
    with pytest.raises(HessianError, match="NaN"):
        factor_hessian(H)
    H = -torch.eye(5) * 1e6
    with pytest.raises(HessianError, match="percdamp"):
        factor_hessian(H, max_tries=3)


def test_half_precision_weights_are_solved_in_float32():
    W = torch.randn(16, 32)
    H = correlated_hessian(32)
    f = factor_hessian(H)
    lv = G.uniform_levels(32, 4)
    a = gptq_solve(W.bfloat16(), f, lv)
    b = gptq_solve(W.bfloat16().float(), f, lv)
    assert a.weight.dtype == torch.float32
    assert torch.equal(a.weight, b.weight)


def textbook_factor(H, percdamp, act_order):
    """GPTQ's factorisation step by step, a full copy per step (what factor_hessian did before
    it worked in place): dead inputs to 1, reorder, dampen, Cholesky, invert, Cholesky again;
    each failure raises the dampening tenfold."""
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    perm = perm if act_order else torch.arange(H.shape[0])
    H = H[perm][:, perm]
    damp = percdamp
    while True:
        Hd = H + damp * torch.diagonal(H).mean().item() * torch.eye(H.shape[0], dtype=H.dtype)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U.float(), perm, dead, damp
        damp *= 10


def hessian_with_dead_inputs(cols, dtype):
    X = torch.randn(cols, 3 * cols, dtype=dtype) * torch.rand(cols, 1, dtype=dtype)
    X[[1, cols // 2, cols - 1]] = 0
    return 2 * X @ X.t() / X.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_the_in_place_factor_equals_the_textbook_steps_bit_for_bit(dtype, act_order):
    # 600 columns: the reordering gathers 256 at a time, so three gathers, one ragged
    H = hessian_with_dead_inputs(600, dtype)
    f = factor_hessian(H, 0.01, act_order)
    U, perm, dead, damp = textbook_factor(H, 0.01, act_order)
    assert torch.equal(f.perm, perm) and torch.equal(f.dead, dead) and f.percdamp == damp
    assert f.U.dtype == torch.float32 and torch.equal(f.U, U)


def test_the_retried_factor_equals_the_textbook_steps_and_leaves_h_alone():
    Qm, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    eig = torch.linspace(1, 2, 300, dtype=torch.float64)
    eig[-1] = -0.05  # indefinite: the first two dampening levels fail
    H = Qm @ torch.diag(eig) @ Qm.t()
    before = H.clone()
    f = factor_hessian(H, 0.001, act_order=True)
    U, perm, _, damp = textbook_factor(H, 0.001, True)
    assert f.percdamp == damp > 0.001
    assert torch.equal(f.U, U) and torch.equal(f.perm, perm)
    assert torch.equal(H, before)  # the caller's H is never written

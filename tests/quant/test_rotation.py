"""The randomized Hadamard transform (baq.quant.rotation, issue 27 item 2): the fast transform
against its dense definition, orthogonality, seeds, the layer-level rotation, GPTQ in the rotated
basis, and the flattening of BAQ's predicted gain that the issue predicts."""

import pytest
import torch

from baq.config import QuantConfig
from baq.quant import allocate
from baq.quant import rotation as rot
from baq.quant.gptq import factor_hessian, gptq_solve, proxy_loss
from baq.quant.grid import fit_grid, uniform_levels
from baq.quant.layer import column_sensitivity

SIZES = [1, 2, 8, 12, 20, 24, 28, 36, 64, 72, 576, 640, 1536, 2048]
UNSUPPORTED = [0, 6, 7, 44, 100, 1000, 3 * 5 * 4]


def eye(n):
    return torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("h", [12, 20, 28, 36])
def test_paley_matrices_are_hadamard(h):
    H = rot.small_hadamard(h)
    assert H.shape == (h, h)
    assert torch.equal(H.abs(), torch.ones(h, h, dtype=torch.float64))
    assert torch.equal(H @ H.t(), h * eye(h))


@pytest.mark.parametrize("q", [11, 19, 13, 17])
def test_conference_matrix(q):
    C = rot.conference_matrix(q).double()
    assert torch.equal(C @ C.t(), q * eye(q + 1))
    # skew for q = 3 mod 4 (Paley I), symmetric for q = 1 mod 4 (Paley II)
    assert torch.equal(C.t(), -C if q % 4 == 3 else C)


@pytest.mark.parametrize("p", [1, 2, 4, 32, 256])
def test_fwht_is_sylvester(p):
    x = torch.randn(3, 5, p, dtype=torch.float64)
    S = rot.sylvester(p)
    assert torch.equal(S @ S.t(), p * eye(p))
    torch.testing.assert_close(rot.fwht(x), x @ S, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_equals_dense_matrix(n):
    r = rot.HadamardRotation(n, seed=5)
    h, p = rot.hadamard_factors(n)
    assert h * p == n and h in (1, 12, 20, 28, 36) and p & (p - 1) == 0
    # the definition, built independently of the fast path: kron, Sylvester, diag(s), / sqrt(n)
    s = r.signs(dtype=torch.float64)
    R = torch.kron(rot.small_hadamard(h), rot.sylvester(p)) @ torch.diag(s) / n**0.5
    torch.testing.assert_close(r.matrix(), R, rtol=0, atol=1e-14)
    torch.testing.assert_close(R @ R.t(), eye(n), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(r.apply(x), x @ R.t(), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.inverse(x), x @ R, rtol=0, atol=1e-12)
    # float32 follows the same matrix to float32 rounding
    x32 = x.float()
    torch.testing.assert_close(r.apply(x32), (x32.double() @ R.t()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [12, 64, 576, 640, 1536])
def test_inverse_gives_back_the_input(n, device):
    r = rot.HadamardRotation(n, seed=1)
    x = torch.randn(4, 7, n, device=device)
    y = r.apply(x)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.device == x.device
    # orthogonal: the norm stays, and R^T R x = x to float32 rounding
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(r.inverse(y), x, rtol=0, atol=2e-6 * x.abs().max().item())
    torch.testing.assert_close(r.apply(r.inverse(x)), x, rtol=0, atol=2e-6 * x.abs().max().item())


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_sizes_say_what_is_supported(n):
    with pytest.raises(ValueError, match=rf"size {n}: supported sizes are 2\^k, or h \* 2\^k"):
        rot.HadamardRotation(n, seed=0)


def test_wrong_last_dimension_and_dtype():
    r = rot.HadamardRotation(8, seed=0)
    with pytest.raises(ValueError, match="last dimension 12"):
        r.apply(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="float tensor"):
        r.apply(torch.zeros(3, 8, dtype=torch.int64))
    # half inputs are rotated in float32 and returned in their own dtype
    x = torch.randn(5, 8)
    y = r.apply(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), r.apply(x.half().float()), rtol=1e-3, atol=1e-3)


def test_seed_fixes_the_transform():
    a, b = rot.HadamardRotation(640, 7), rot.HadamardRotation(640, 7)
    assert torch.equal(a.signs(), b.signs())
    x = torch.randn(3, 640)
    assert torch.equal(a.apply(x), b.apply(x))
    c = rot.HadamardRotation(640, 8)
    assert not torch.equal(a.signs(), c.signs())
    assert not torch.allclose(a.apply(x), c.apply(x))
    # the global RNG neither feeds nor is consumed by the signs
    state = torch.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(a.signs(), b.signs())
    torch.set_rng_state(state)


def test_layer_seed_is_stable_and_per_name():
    # a fixed value: a reader in another process (or Python version) must regenerate the same R
    assert rot.layer_seed(0, "a") == 8281872861307171038
    seeds = {rot.layer_seed(s, n) for s in (0, 1) for n in ("q_proj", "k_proj", "v_proj")}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


def correlated_hessian(cols, n=1024, outliers=()):
    """``2 X X^T / n`` of inputs with shared factors, uneven scales and a few outlier channels."""
    X = torch.randn(cols, cols // 4) @ torch.randn(cols // 4, n) + 0.3 * torch.randn(cols, n)
    X = X * (0.5 + torch.rand(cols, 1))
    X[list(outliers)] *= 30.0
    return (2 * X @ X.t() / n).double()


def test_rotated_layer_computes_the_same_function():
    rows, cols = 24, 36
    W = torch.randn(rows, cols, dtype=torch.float64)
    H = correlated_hessian(cols)
    r = rot.HadamardRotation(cols, seed=3)
    R = r.matrix()
    Wr, Hr = rot.rotate_input(W, H, r)
    torch.testing.assert_close(Wr, W @ R.t(), rtol=0, atol=1e-12)
    torch.testing.assert_close(Hr, R @ H @ R.t(), rtol=1e-12, atol=1e-9)
    assert torch.equal(Hr, Hr.t())
    x = torch.randn(5, cols, dtype=torch.float64)
    torch.testing.assert_close(r.apply(x) @ Wr.t(), x @ W.t(), rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.unrotate_input(Wr, r), W, rtol=0, atol=1e-12)
    # the proxy loss of any error is the same in either basis
    D = 0.01 * torch.randn(rows, cols, dtype=torch.float64)
    Dr = rot.rotate_input(D, None, r)[0]
    assert proxy_loss(Wr, Wr - Dr, Hr) == pytest.approx(proxy_loss(W, W - D, H), rel=1e-10)

    # output side: Q W, the outputs turned back by Q^T; the Hessian is untouched
    q = rot.HadamardRotation(rows, seed=4)
    Wo = rot.rotate_output(Wr, q)
    torch.testing.assert_close(Wo, q.matrix() @ Wr, rtol=0, atol=1e-12)
    y = rot.unrotate_output(r.apply(x) @ Wo.t(), q)
    torch.testing.assert_close(y, x @ W.t(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cols,chunk", [(36, 7), (640, 100), (640, 256), (1536, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hessian_rotated_by_row_chunks_is_the_whole_matrix_expression(
    cols, chunk, dtype, monkeypatch
):
    """rotate_input transforms H a chunk of rows at a time and symmetrises in place (so that
    it holds two Hessian-sized matrices, not six): the whole-matrix expression to the
    rounding of the dense Hadamard factor's products (BLAS may sum a 7-row product in another
    order than a 36-row one), with chunks that do not divide the size, one chunk, and two
    threads; exactly symmetric."""
    monkeypatch.setattr(rot, "ROW_CHUNK", chunk)
    H = correlated_hessian(cols).to(dtype)
    r = rot.HadamardRotation(cols, seed=5)
    whole = r.apply(r.apply(H).mT)
    whole = (whole + whole.mT) / 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Hr = rot.rotate_input(torch.randn(3, cols, dtype=dtype), H, r)[1]
    finally:
        torch.set_num_threads(threads)
    assert Hr.dtype == dtype and torch.equal(Hr, Hr.mT)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(Hr, whole, rtol=8 * eps, atol=8 * eps * float(whole.abs().max()))
    R = r.matrix()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(Hr.double(), R @ H.double() @ R.t(), rtol=tol, atol=tol)


@pytest.mark.parametrize("cols,act_order", [(64, False), (36, True), (640, False)])
def test_gptq_on_rotated_layer_equals_gptq_on_explicit_rotation(cols, act_order):
    rows = 16
    W = torch.randn(rows, cols, dtype=torch.float64)
    H = correlated_hessian(cols, outliers=(1, 5))
    r = rot.HadamardRotation(cols, seed=11)
    R = r.matrix()
    Wr, Hr = rot.rotate_input(W, H, r)
    We, He = W @ R.t(), R @ H @ R.t()
    levels = uniform_levels(cols, 3)
    # float64 solves: a weight at a rounding boundary could otherwise round differently
    fast = gptq_solve(Wr, factor_hessian(Hr, 0.01, act_order), levels, block_size=32)
    ref = gptq_solve(We, factor_hessian(He, 0.01, act_order), levels, block_size=32)
    assert torch.equal(fast.codes, ref.codes)
    torch.testing.assert_close(fast.weight, ref.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.losses, ref.losses, rtol=1e-4, atol=1e-9)
    # the dequantized rotated weight, rotated back, is a quantization of W with the same loss
    back = rot.unrotate_input(fast.weight.double(), r)
    assert proxy_loss(W, back, H) == pytest.approx(proxy_loss(Wr, fast.weight, Hr), rel=1e-8)


def analytic_gain(W, H):
    cfg = QuantConfig(method="baq", bits=3, sensitivity="analytic", allocation="layer")
    factor = factor_hessian(H, cfg.percdamp)
    Wd = W.float().clone()
    Wd[:, factor.dead] = 0
    sens, _ = column_sensitivity(Wd, factor, fit_grid(Wd, dim="oc"), cfg)
    return allocate.predicted_gain(sens)


@pytest.mark.parametrize(
    "factors,floor", [(64, 0.5), (0, 0.85)], ids=["correlated-inputs", "independent-inputs"]
)
def test_rotation_flattens_baqs_predicted_gain(factors, floor):
    """Issue 27: incoherence processing flattens the per-column differences BAQ's closed form
    exploits, so its predicted gain ``geomean(c) / mean(c)`` moves towards 1. What stays is the
    spread of the conditional variances ``1 / U_jj^2`` along the Cholesky order, which
    correlated inputs keep (about 0.3 before and after on such inputs without outliers)."""
    rows, cols, n = 64, 256, 1024
    X = 0.3 * torch.randn(cols, n)
    if factors:
        X += torch.randn(cols, factors) @ torch.randn(factors, n)
    X *= 0.5 + torch.rand(cols, 1)
    X[[3, 40, 77, 200]] *= 30.0  # outlier input channels, as in LLM activations
    H = (2 * X @ X.t() / n).double()
    W = torch.randn(rows, cols, dtype=torch.float64)
    Wr, Hr = rot.rotate_input(W, H, rot.HadamardRotation(cols, seed=0))
    before, after = analytic_gain(W, H), analytic_gain(Wr, Hr)
    # a few outlier columns carry most of the modelled loss (0.20 and 0.13 here)
    assert before < 0.3
    assert after > floor


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block", [2, 8, 32], ids=["b2", "b8", "b32"])
def test_blocked_transform_equals_the_dense_matrix(n, block, monkeypatch):
    """The run-time transform of activations (dense Sylvester factors instead of butterflies)
    is the same R, forward and transposed, for every supported size and factor size."""
    monkeypatch.setattr(rot, "BLOCK", block)
    h, p = rot.hadamard_factors(n)
    x = torch.randn(4, 3, n, dtype=torch.float64)
    torch.testing.assert_close(rot.fwht_blocked(x[..., :p], block), x[..., :p] @ rot.sylvester(p),
                               rtol=0, atol=1e-12)  # fmt: skip
    r = rot.HadamardRotation(n, seed=11)
    R = r.matrix()
    y = r.apply(x, blocked=True)
    torch.testing.assert_close(y, x @ R.T, rtol=0, atol=1e-12)
    Hn = torch.kron(rot.small_hadamard(h), rot.sylvester(p))
    torch.testing.assert_close(rot.hadamard_transform(x, transpose=True, blocked=True), x @ Hn,
                               rtol=0, atol=1e-11)  # fmt: skip
    # float32 activations, as a packed layer's forward gives them
    torch.testing.assert_close(r.apply(x.float(), blocked=True), (x @ R.T).float(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip

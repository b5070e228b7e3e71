"""A layer quantized with ``rotate=True`` (baq.quant.layer, issue 27 item 2) against a slow
reference: the same method run unrotated on the explicitly rotated weight and Hessian, built
from the dense matrix ``R`` in float64."""

import pytest
import torch

from baq.config import QuantConfig
from baq.quant import rotation as rot
from baq.quant.grid import dequantize
from baq.quant.layer import layer_rotation, quantize_layer

NAME = "model.layers.3.mlp.down_proj"


def layer(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few outlier columns and a float64 Hessian of correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[:, :3] *= 8  # outliers: what rotation spreads over every column
    X = torch.randn(cols, 4 * cols, generator=g, dtype=torch.float64)
    X = X * torch.rand(cols, 1, generator=g, dtype=torch.float64) * 3
    return W, 2 * X @ X.T / X.shape[1]


def dense_reference(W, H, cfg):
    """Quantize ``W R^T`` on ``R H R^T`` without ``rotate``, ``R`` the dense float64 matrix of
    the layer's seed; returns the result and ``R``."""
    seed = rot.layer_seed(cfg.rotate_seed, NAME)
    R = rot.HadamardRotation(W.shape[1], seed).matrix()
    Wr = (W.double() @ R.T).float()
    Hr = R @ H @ R.T
    plain = QuantConfig(**{**cfg.__dict__, "rotate": False})
    res, _ = quantize_layer(Wr, (Hr + Hr.T) / 2, plain, NAME)
    return res, R


CASES = {
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq"),
    "gptq-clip": dict(method="gptq", clip=True),
    "gptq-ic": dict(method="gptq", dim="ic"),
    "gptq-auto-g16": dict(method="gptq", dim="auto", group_size=16),
    "baq-measured": dict(method="baq", bits=2.5, allocation="layer", sensitivity="measured"),
    "baq-analytic-act": dict(
        method="baq", bits=3.5, allocation="layer", sensitivity="analytic", act_order=True
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rotated_layer_equals_the_dense_reference(case):
    cols = 48 if case == "gptq-ic" else 64  # 48 = 12 x 4: a Paley factor too
    W, H = layer(24, cols)
    kwargs = {"bits": 3.0, **CASES[case]}
    cfg = QuantConfig(hessian_dtype="float64", rotate=True, rotate_seed=7, **kwargs)
    res, rec = quantize_layer(W, H, cfg, NAME)
    ref, R = dense_reference(W, H, cfg)
    assert res.rotation == rot.layer_seed(7, NAME) and rec.rotated
    # the codes, grid and levels are the rotated layer's, as the slow reference computes them
    assert torch.equal(res.codes, ref.codes)
    assert torch.equal(res.levels, ref.levels)
    assert torch.equal(res.grid.lo, ref.grid.lo) and torch.equal(res.grid.hi, ref.grid.hi)
    torch.testing.assert_close(res.losses, ref.losses, rtol=1e-4, atol=1e-6)
    # the weight written back is the dequantized rotated one, taken back: W' R
    Wq_r = dequantize(res.codes, res.grid, res.levels)
    torch.testing.assert_close(res.weight.double(), Wq_r.double() @ R, rtol=0, atol=1e-5)
    # and it computes (R x) -> W' (R x) = W x' for any input
    x = torch.randn(5, W.shape[1], dtype=torch.float64)
    torch.testing.assert_close(
        x @ res.weight.double().T, (x @ R.T) @ Wq_r.double().T, rtol=0, atol=1e-4
    )


def test_rotation_lowers_the_proxy_loss_of_outlier_columns():
    """The point of it (QuIP): GPTQ at 3 bits on a layer with outlier columns loses less in
    the rotated basis (the proxy loss ``tr(D H D^T)`` is the same quantity in both bases)."""
    W, H = layer(64, 64, seed=1)
    plain, _ = quantize_layer(W, H, QuantConfig(method="gptq", bits=3.0, rotate=False), NAME)
    rotated, _ = quantize_layer(W, H, QuantConfig(method="gptq", bits=3.0, rotate=True), NAME)

    def loss(Q):
        D = (W - Q).double()
        return float(torch.trace(D @ H @ D.T))

    assert loss(rotated.weight) < 0.8 * loss(plain.weight)


def test_seeds_follow_the_name_and_the_run_seed():
    cfg = QuantConfig(method="gptq", rotate=True)
    a = layer_rotation(cfg, "a.q_proj", 64)
    assert a.seed == rot.layer_seed(0, "a.q_proj")
    assert layer_rotation(cfg, "a.k_proj", 64).seed != a.seed
    assert layer_rotation(QuantConfig(method="gptq", rotate=True, rotate_seed=1), "a.q_proj", 64)
    assert layer_rotation(QuantConfig(method="gptq", rotate=False), "a.q_proj", 64) is None
    assert layer_rotation(QuantConfig(method="rtn"), "a.q_proj", 64) is None  # RTN: plain


def test_a_width_without_a_transform_stays_unrotated():
    """44 = 11 x 4 has no Hadamard construction here: the layer is quantized as it is."""
    W, H = layer(16, 44)
    cfg = QuantConfig(method="gptq", rotate=True)
    assert layer_rotation(cfg, NAME, 44) is None
    res, rec = quantize_layer(W, H.float(), cfg, NAME)
    plain, _ = quantize_layer(W, H.float(), QuantConfig(method="gptq"), NAME)
    assert res.rotation is None and not rec.rotated
    assert torch.equal(res.codes, plain.codes) and torch.equal(res.weight, plain.weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rotate="yes"), "rotate='yes'"),
        (dict(rotate=True, rotate_seed=-1), "rotate_seed=-1"),
        (dict(rotate=True, rotate_seed=2**63), "rotate_seed="),
        (dict(rotate=True, rotate_seed=True), "rotate_seed=True"),
        (dict(rotate=True, dim="auto", adadim="block"), "use --adadim proxy with --rotate"),
    ],
    ids=["not-bool", "negative-seed", "seed-too-large", "bool-seed", "adadim-block"],
)
def test_bad_rotation_settings_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        QuantConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_rotation_with_per_ic_grids_is_accepted():
    assert QuantConfig(method="gptq", dim="ic", rotate=True).rotate

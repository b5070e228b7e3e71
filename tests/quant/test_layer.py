import math

import pytest
import torch

from baq.config import QuantConfig
from baq.quant import allocate as A
from baq.quant.gptq import proxy_loss
from baq.quant.layer import quantize_layer


def uneven_layer(rows=48, cols=160, n=1024):
    """A layer whose columns differ in importance by orders of magnitude (input scales vary)."""
    scale = torch.exp(2.0 * torch.randn(cols, 1))
    X = (torch.randn(cols, n) + 0.2 * torch.randn(1, n)) * scale
    H = 2 * X @ X.t() / n
    W = torch.randn(rows, cols) * 0.05
    return W, H


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sensitivity", ["measured", "analytic"])
def test_baq_beats_uniform_gptq_at_the_same_rate(bits, sensitivity):
    W, H = uneven_layer()
    gptq, grec = quantize_layer(W, H, QuantConfig(method="gptq", bits=bits))
    baq, brec = quantize_layer(
        W, H, QuantConfig(allocation="layer", method="baq", bits=bits, sensitivity=sensitivity)
    )
    assert brec.nominal_bits <= bits + 1e-9
    assert brec.nominal_bits > bits - 1.0 / W.shape[1]
    # measured: the true layer-output error proxy and GPTQ's own loss
    assert proxy_loss(W, baq.weight, H) < proxy_loss(W, gptq.weight, H)
    assert brec.loss < grec.loss
    # modelled: the loss model at the allocation beats the model at uniform levels
    assert brec.modelled_gain < 1
    assert 0 < brec.predicted_gain < 1


def test_baq_record_is_consistent_with_its_result():
    W, H = uneven_layer()
    res, rec = quantize_layer(W, H, QuantConfig(allocation="layer", method="baq", bits=2.5))
    assert rec.nominal_bits == pytest.approx(torch.log2(res.levels.double()).mean().item())
    assert sum(rec.level_histogram.values()) == W.shape[1]
    assert rec.uniform_loss is not None and rec.loss_ratio == rec.loss / rec.uniform_loss
    assert rec.loss == pytest.approx(res.losses.double().sum().item())
    # every weight is one of its column's L_j grid points
    from baq.quant.grid import dequantize
    from baq.quant.rotation import original_basis

    assert (res.codes < res.levels.unsqueeze(0)).all()
    assert res.rotation is not None  # the default rotates; the weight is in the original basis
    on_grid = dequantize(res.codes, res.grid, res.levels)
    assert torch.equal(original_basis(on_grid, res.rotation), res.weight)


def test_integer_bits_mode_uses_powers_of_two_and_beats_gptq():
    W, H = uneven_layer()
    res, rec = quantize_layer(
        W, H, QuantConfig(allocation="layer", method="baq", bits=3, integer_bits=True)
    )
    b = torch.log2(res.levels.double())
    assert torch.equal(b, b.round())
    assert rec.nominal_bits <= 3
    gptq, _ = quantize_layer(W, H, QuantConfig(method="gptq", bits=3))
    assert proxy_loss(W, res.weight, H) < proxy_loss(W, gptq.weight, H)


def test_equal_sensitivities_reduce_baq_to_gptq():
    # identical, independent columns: the allocation is uniform, so BAQ's solve is GPTQ's
    rows, cols = 16, 32
    H = torch.eye(cols) * 2.0
    W = torch.linspace(-1, 1, cols).repeat(rows, 1)  # every column has the same spread
    W[:, ::2] *= -1
    baq, rec = quantize_layer(
        W, H, QuantConfig(allocation="layer", method="baq", bits=3, sensitivity="analytic")
    )
    gptq, _ = quantize_layer(W, H, QuantConfig(method="gptq", bits=3))
    assert (baq.levels == 8).all()
    assert torch.equal(baq.weight, gptq.weight)


def test_rtn_has_no_hessian_and_uniform_levels():
    W = torch.randn(8, 24)
    res, rec = quantize_layer(W, None, QuantConfig(method="rtn", bits=2))
    assert (res.levels == 4).all() and rec.nominal_bits == 2
    assert math.isclose(A.predicted_gain(torch.ones(3)), 1.0)

"""PackedLinear's weight caches: the ``codes`` forward against the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from baq.quant.gptq import QuantResult
from baq.quant.grid import fit_grid, quantize
from baq.saved.packed_linear import PackedLinear


def _result(rows, cols, group_size, sym, max_levels, seed=0):
    """A layer quantized by RTN with random per-column level counts, some of one level."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g)
    levels = torch.randint(1, max_levels + 1, (cols,), generator=g)
    levels[0], levels[-1] = 1, max_levels
    grid = fit_grid(W, group_size=group_size, sym=sym)
    codes, weight = quantize(W, grid, levels)
    return QuantResult(weight, codes, grid, levels, torch.zeros(cols))


@pytest.mark.parametrize(
    "group_size,sym,max_levels",
    [(None, False, 16), (None, True, 9), (32, False, 40), (48, False, 256), (16, True, 200)],
    ids=["row", "row-sym", "groups", "partial-group-256", "groups-sym-int16"],
)
def test_codes_cache_forward_equals_the_dequantized_forward(group_size, sym, max_levels):
    rows, cols = 40, 150  # 150 = 4 full groups of 32 + 22, 3 of 48 + 6, 9 of 16 + 6
    res = _result(rows, cols, group_size, sym, max_levels)
    bias = torch.randn(rows)
    layer = PackedLinear.from_quantized(res, bias, cache="codes")
    x = torch.randn(2, 5, cols)
    with torch.inference_mode():
        y = layer(x)
        again = layer(x)
    want = F.linear(x.double(), res.weight.double(), bias.double())
    assert y.shape == (2, 5, rows) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(y, again)
    offsets = layer._offsets
    assert offsets is not None and layer._weight is None  # no dequantized weight is kept
    # one byte per weight unless a column has more than 128 levels
    assert offsets.offsets.dtype == (torch.int8 if max_levels <= 128 else torch.int16)
    assert offsets.offsets.shape == (rows, cols)


def test_codes_cache_in_bfloat16_and_offsets_dequantize_to_the_weight():
    res = _result(24, 64, None, False, 12, seed=3)
    layer = PackedLinear.from_quantized(res, cache="codes")
    offsets = layer.offset_codes()
    rebuilt = offsets.offsets.double() * offsets.span.double() * offsets.inv.double()
    torch.testing.assert_close(rebuilt, res.weight.double(), rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    want = F.linear(x, res.weight)
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_weight_cache_keeps_the_exact_weight_and_none_keeps_nothing():
    res = _result(16, 48, 16, False, 8, seed=5)
    x = torch.randn(4, 48)
    kept = PackedLinear.from_quantized(res, cache="weight")
    plain = PackedLinear.from_quantized(res)
    with torch.no_grad():
        assert torch.equal(kept(x), F.linear(x, res.weight))
        assert torch.equal(plain(x), F.linear(x, res.weight))
    assert torch.equal(kept._weight, res.weight)
    assert plain._weight is None and plain._offsets is None
    with pytest.raises(ValueError, match="cache='fast': use one of none, codes, weight"):
        PackedLinear.from_quantized(res, cache="fast")

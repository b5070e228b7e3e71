import pytest
import torch

from baq.quant import grid as G


def _levels(cols: int) -> torch.Tensor:
    return torch.randint(1, 300, (cols,))


@pytest.mark.parametrize("group_size", [None, 4, 7], ids=["per-row", "g4", "g7-ragged"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_codes_in_range_and_error_within_half_step(group_size, sym, device):
    W = torch.randn(9, 23, device=device)
    grid = G.fit_grid(W, group_size, sym)
    levels = _levels(23).to(device)
    levels[:3] = torch.tensor([1, 2, 3])
    codes, deq = G.quantize(W, grid, levels)
    assert codes.min() >= 0
    assert (codes <= (levels - 1).unsqueeze(0)).all()
    step, zero = G.column_params(grid, levels)
    multi = levels > 1
    # inside the representable range the error is at most half a step
    lo_rep = (0 - zero) * step
    hi_rep = (levels.unsqueeze(0) - 1 - zero) * step
    inside = (W >= lo_rep) & (W <= hi_rep) & multi.unsqueeze(0)
    err = (W - deq).abs()
    assert inside.float().mean() > 0.5
    assert (err[inside] <= step[inside] / 2 * (1 + 1e-5) + 1e-7).all()
    # the rounded zero point shifts the grid by at most half a step: nothing in [lo, hi] is
    # further than one step from its code
    m = multi.unsqueeze(0).expand_as(W)
    assert (err[m] <= step[m] * (1 + 1e-5) + 1e-7).all()


def test_one_level_columns_are_constant_zero(device):
    W = torch.randn(6, 5, device=device)
    levels = torch.tensor([1, 4, 1, 16, 1], device=device)
    codes, deq = G.quantize(W, G.fit_grid(W), levels)
    assert (codes[:, levels == 1] == 0).all()
    assert (deq[:, levels == 1] == 0).all()


def test_range_contains_zero_and_weights_and_is_half_exact():
    W = torch.randn(7, 40) * 3 + 1.0  # mostly positive rows
    grid = G.fit_grid(W, 16)
    assert (grid.lo <= 0).all() and (grid.hi >= 0).all()
    assert torch.equal(grid.lo, grid.lo.half().float())
    assert torch.equal(grid.hi, grid.hi.half().float())
    for g in range(grid.lo.shape[1]):
        block = W[:, g * 16 : (g + 1) * 16]
        assert (block.amin(1) >= grid.lo[:, g]).all()
        assert (block.amax(1) <= grid.hi[:, g]).all()


def test_power_of_two_levels_match_reference_rtn():
    # the classic GPTQ/RTN asymmetric quantizer written out by hand, per row
    W = torch.randn(5, 12)
    bits = 3
    grid = G.fit_grid(W)
    codes, deq = G.quantize(W, grid, G.uniform_levels(12, bits))
    maxq = 2**bits - 1
    for r in range(5):
        lo, hi = grid.lo[r, 0].item(), grid.hi[r, 0].item()
        scale = (hi - lo) / maxq
        zero = round(-lo / scale)
        for c in range(12):
            q = min(max(round(W[r, c].item() / scale) + zero, 0), maxq)
            assert codes[r, c].item() == q
            assert abs(deq[r, c].item() - (q - zero) * scale) < 1e-6


def test_dequantize_inverts_codes():
    W = torch.randn(8, 30)
    grid = G.fit_grid(W, 8, sym=True)
    levels = _levels(30)
    codes, deq = G.quantize(W, grid, levels)
    assert torch.equal(G.dequantize(codes, grid, levels), deq)


def test_all_zero_rows_get_a_valid_grid():
    W = torch.zeros(3, 10)
    W[1] = torch.randn(10)
    codes, deq = G.quantize(W, G.fit_grid(W), G.uniform_levels(10, 2))
    assert torch.isfinite(deq).all()
    assert (deq[0] == 0).all() and (deq[2] == 0).all()


def published_rtn(W, bits):
    """RTN as GPTQ's reference quantizer writes it: float32 scale and zero point per row."""
    maxq = 2**bits - 1
    xmin = W.min(dim=1).values.clamp(max=0)
    xmax = W.max(dim=1).values.clamp(min=0)
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1, 1
    scale = ((xmax - xmin) / maxq).unsqueeze(1)
    zero = torch.round(-xmin / scale.squeeze(1)).unsqueeze(1)
    q = torch.clamp(torch.round(W / scale) + zero, 0, maxq)
    return scale * (q - zero)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_float32_ranges_reproduce_the_published_rtn(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 96, generator=g) * torch.rand(64, 1, generator=g)
    W[3] = 0  # an all-zero row takes the [-1, 1] convention
    levels = G.uniform_levels(96, bits)
    _, exact = G.quantize(W, G.fit_grid(W, range_dtype="float32"), levels)
    assert torch.allclose(exact, published_rtn(W, bits), rtol=0, atol=1e-6)
    # the default float16 ranges move some weights to a neighbouring level
    _, half = G.quantize(W, G.fit_grid(W), levels)
    assert not torch.equal(half, exact)
    with pytest.raises(ValueError, match="range_dtype='bfloat16'"):
        G.fit_grid(W, range_dtype="bfloat16")

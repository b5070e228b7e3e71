import pytest
import torch

from baq.model import blocks
from baq.run.hessian import HessianAccumulator, StopForward, hessian_hooks
from helpers import ARCH_IDS, make_tiny_llama, tiny_model


def slow_hessian(xs):
    """2 X^T X / n over all tokens, in float64 from the raw inputs."""
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    return 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulator_matches_the_full_product(dtype):
    g = torch.Generator().manual_seed(0)
    # ragged batches, a non-contiguous one, a bf16 one (the accumulator converts)
    xs = [
        torch.randn(3, 7, 24, generator=g),
        torch.randn(24, 5, generator=g).t(),
        torch.randn(11, 24, generator=g).bfloat16(),
    ]
    acc = HessianAccumulator(24, torch.device("cpu"), dtype)
    for x in xs:
        acc.add(x)
    H = acc.hessian()
    assert acc.tokens == 21 + 5 + 11
    assert H.dtype == dtype
    assert torch.equal(H, H.t())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(H.double(), slow_hessian([x.float() for x in xs]), rtol=tol, atol=tol)


@pytest.mark.parametrize("cols", [24, 450])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hessian_is_made_in_place_bitwise_the_textbook_mirror(cols, dtype):
    """hessian() turns the accumulator's own lower triangle into H (strips of TILE rows, a
    width that is not a multiple of it): bitwise ``(low + low.tril(-1).t()) * 2 / n`` of a copy,
    in the accumulator's memory; shared linears get that one tensor; no input after it."""
    g = torch.Generator().manual_seed(cols)
    acc = HessianAccumulator(cols, torch.device("cpu"), dtype)
    for n in (5, 17):
        acc.add(torch.randn(n, cols, generator=g))
    low = acc.sum.clone().tril()
    expected = (low + low.tril(-1).t()) * (2.0 / acc.tokens)
    H = acc.hessian()
    assert torch.equal(H, expected) and torch.equal(H, H.t())
    assert H.data_ptr() == acc.sum.data_ptr()  # no second matrix
    assert acc.hessian() is H  # a linear sharing the input gets the same H, not rescaled
    with pytest.raises(RuntimeError, match="after the Hessian was made"):
        acc.add(torch.randn(2, cols))


def calib(vocab, n=4, seq=16):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


def block_and_inputs(model):
    block = blocks.decoder_layers(model)[0]
    ids = calib(model.config.vocab_size)
    inputs, kwargs = blocks.capture_block_inputs(model, ids, torch.device("cpu"))
    return block, blocks.linears(block), inputs, kwargs


def test_shared_inputs_share_one_hessian_equal_to_separate_ones():
    block, lin, inputs, kwargs = block_and_inputs(make_tiny_llama())
    seen = {name: [] for name in lin}
    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: seen[name].append(a[0].clone()))
        for name, m in lin.items()
    ]
    with torch.no_grad(), hessian_hooks(block, lin, torch.float64) as accs:
        for x in inputs:
            blocks.run_block(block, x, kwargs)
    for h in handles:
        h.remove()
    for name, xs in seen.items():
        assert torch.allclose(accs[name].hessian(), slow_hessian(xs), rtol=1e-10, atol=1e-12)
    assert accs["self_attn.q_proj"] is accs["self_attn.k_proj"] is accs["self_attn.v_proj"]
    assert accs["mlp.gate_proj"] is accs["mlp.up_proj"]
    assert accs["self_attn.o_proj"] is not accs["mlp.down_proj"]


@pytest.mark.parametrize("arch", ARCH_IDS, ids=ARCH_IDS)
def test_early_stop_gives_the_same_hessians_and_skips_the_rest_of_the_block(arch):
    block, lin, inputs, kwargs = block_and_inputs(tiny_model(arch))

    def collect(stop_early):
        ran = {name: 0 for name in lin}  # completed forwards of each linear
        handles = [
            m.register_forward_hook(lambda *_, name=name: ran.__setitem__(name, ran[name] + 1))
            for name, m in lin.items()
        ]
        stopped = 0
        with torch.no_grad(), hessian_hooks(block, lin, torch.float64, stop_early) as accs:
            for x in inputs:
                try:
                    blocks.run_block(block, x, kwargs)
                except StopForward:
                    stopped += 1
        for h in handles:
            h.remove()
        return {name: acc.hessian() for name, acc in accs.items()}, ran, stopped

    full, ran_full, _ = collect(False)
    early, ran_early, stopped = collect(True)
    assert full.keys() == early.keys() == lin.keys()
    for name in lin:
        assert torch.equal(full[name], early[name]), name
    # every forward after the first stops before the last linear runs
    assert stopped == len(inputs) - 1
    last = [name for name in lin if ran_early[name] < ran_full[name]]
    assert len(last) == 1 and ran_early[last[0]] == 1

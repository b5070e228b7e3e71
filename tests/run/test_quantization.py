import copy

import pytest
import torch

from baq.config import QuantConfig
from baq.model import blocks
from baq.quant.grid import dequantize
from baq.quant.rotation import original_basis
from baq.run.quantization import is_skipped, quantize_model
from baq.run.report import weighted_nominal_bits
from helpers import ARCH_IDS, ARCHS, VOCAB, make_tiny_llama, tiny_model


def make_tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def calib(n=6, seq=32):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(1))


METHODS = [
    QuantConfig(method="rtn", bits=3),
    QuantConfig(method="gptq", bits=2),
    QuantConfig(method="gptq", bits=3, group_size=16, act_order=True),
    QuantConfig(allocation="layer", method="baq", bits=2.5),
    QuantConfig(allocation="layer", method="baq", bits=3, sensitivity="analytic", sym=True),
    QuantConfig(allocation="layer", method="baq", bits=2, integer_bits=True),
]
IDS = ["rtn3", "gptq2", "gptq3-g16-actorder", "baq2.5", "baq3-analytic-sym", "baq2-int"]


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
@pytest.mark.parametrize("build", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_every_linear_is_quantized_onto_its_grid(build, cfg):
    model = build()
    original = copy.deepcopy(model)
    ids = calib()
    run = quantize_model(model, ids, cfg, device="cpu", progress=False)

    layers = blocks.decoder_layers(model)
    names = [n for n, m in model.named_modules() if any(m is x for x in layers)]
    expected = {
        f"{prefix}.{short}"
        for prefix, block in zip(names, layers)
        for short in blocks.linears(block)
    }
    assert set(run.results) == expected
    mods = dict(model.named_modules())
    before = dict(original.named_modules())
    for name, res in run.results.items():
        W = blocks.get_weight(mods[name]).float()
        assert not torch.equal(W, blocks.get_weight(before[name]).float()), name
        # what the model computes with is exactly the stored codes on the stored grid (taken
        # back to the original basis for a rotated layer, the default of BAQ and GPTQ)
        assert (res.codes < res.levels.unsqueeze(0)).all()
        on_grid = dequantize(res.codes, res.grid, res.levels)
        assert torch.equal(W, original_basis(on_grid, res.rotation))
        assert (res.rotation is not None) == (cfg.method != "rtn"), name
        if cfg.method != "baq" or cfg.integer_bits:
            b = torch.log2(res.levels.double())
            assert torch.equal(b, b.round())
    # the report's rate is the rate of the stored level counts
    rate = sum(
        torch.log2(r.levels.double()).sum().item() * r.codes.shape[0] for r in run.results.values()
    )
    rate /= sum(r.codes.numel() for r in run.results.values())
    assert run.nominal_bits == pytest.approx(rate, abs=1e-9)
    assert weighted_nominal_bits(run.records) == pytest.approx(rate, abs=1e-9)
    assert run.nominal_bits <= cfg.bits + 1e-9
    assert run.nominal_bits > cfg.bits - 0.05
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_skip_patterns_leave_layers_untouched():
    model = make_tiny_llama()
    original = copy.deepcopy(model)
    cfg = QuantConfig(method="gptq", bits=3, skip=("*.mlp.down_proj", "q_proj"))
    run = quantize_model(model, calib(), cfg, device="cpu", progress=False)
    mods, before = dict(model.named_modules()), dict(original.named_modules())
    for name in mods:
        if name.endswith(("down_proj", "q_proj")):
            assert name not in run.results
            assert torch.equal(mods[name].weight, before[name].weight)
    assert any(n.endswith("k_proj") for n in run.results)
    assert is_skipped("model.layers.3.mlp.down_proj", ("*.mlp.*",))
    assert not is_skipped("model.layers.3.self_attn.o_proj", ("*.mlp.*",))


def test_nan_weights_are_named():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj.*NaN"):
        quantize_model(model, calib(), QuantConfig(method="rtn", bits=4), progress=False)


def test_same_inputs_same_result():
    a, b = make_tiny_llama(), make_tiny_llama()
    cfg = QuantConfig(allocation="layer", method="baq", bits=3)
    ra = quantize_model(a, calib(), cfg, progress=False)
    rb = quantize_model(b, calib(), cfg, progress=False)
    for name in ra.results:
        assert torch.equal(ra.results[name].codes, rb.results[name].codes)
        assert torch.equal(ra.results[name].levels, rb.results[name].levels)


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_every_architecture_quantizes_end_to_end(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 100, (5, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp = model(ids).logits
    run = quantize_model(
        model, ids, QuantConfig(allocation="layer", method="baq", bits=4), progress=False
    )
    expected = ARCHS[arch][4]
    assert len(run.results) == 2 * len(expected)
    mods = dict(model.named_modules())
    for name, res in run.results.items():
        assert torch.equal(blocks.get_weight(mods[name]).float(), res.weight)
    with torch.no_grad():
        q = model(ids).logits
    assert torch.isfinite(q).all()
    # 4 bits on a random tiny model: the output moves, but stays close
    assert 0 < (q - fp).abs().mean() < fp.abs().mean()


def test_batched_and_single_sample_forwards_agree():
    a, b = make_tiny_llama(), make_tiny_llama()
    cfg = QuantConfig(method="gptq", bits=3)
    ra = quantize_model(a, calib(8), cfg, progress=False, batch_size=1)
    rb = quantize_model(b, calib(8), cfg, progress=False, batch_size=8)
    for name in ra.results:
        same = (ra.results[name].codes == rb.results[name].codes).float().mean()
        assert same > 0.99, name


def test_each_block_runs_one_hessian_pass_and_one_output_pass_except_the_last():
    model = make_tiny_llama(layers=3)
    layers = blocks.decoder_layers(model)
    calls = [0] * len(layers)
    for i, block in enumerate(layers):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = calib(n=6)
    quantize_model(model, ids, QuantConfig(method="gptq", bits=3), "cpu", False, batch_size=2)
    # 3 batches each; the last block's outputs feed nothing (block 0 also runs in the capture)
    assert calls[1:] == [3 + 3, 3] and calls[0] > 3 + 3

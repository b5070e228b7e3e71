"""``cache="kernel"`` of PackedLinear (issue 26): a saved folder loads and runs through the fused
CPU kernel, its layout replaces the packed codes in memory, and whatever reads the codes back
(state_dict, a new save, dequantize) gets the saved bytes exactly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from baq import set_cache
from baq.config import QuantConfig
from baq.quant.gptq import QuantResult
from baq.quant.grid import fit_grid
from baq.saved import storage
from baq.saved.packed_linear import PackedLinear
from helpers import VOCAB, make_tiny_llama, make_tokenizer, quantize_all

CFGS = {
    "baq2.5": QuantConfig(allocation="layer", method="baq", bits=2.5),
    "baq3-g24-sym": QuantConfig(allocation="layer", method="baq", bits=3, group_size=24, sym=True),
    "gptq3-ic-g16": QuantConfig(method="gptq", bits=3, dim="ic", group_size=16),
}


@pytest.fixture(scope="module", params=sorted(CFGS))
def folder(request, tmp_path_factory):
    model = make_tiny_llama()
    cfg = CFGS[request.param]
    results = quantize_all(model, cfg)
    out = tmp_path_factory.mktemp("kernel") / "q"
    storage.save_quantized(out, model, make_tokenizer(), results, cfg)
    return out


@pytest.mark.parametrize("cache", ["kernel", "lanes", "compact", "codes"])
@pytest.mark.parametrize("tokens", [3, 300])  # the fused kernel, and the tile path past 128
def test_gradients_flow_through_packed_layers_as_through_the_weight(folder, cache, tokens):
    """Autograd through a packed linear (LoRA adapters before it, a loss after): the input's and
    the embedding's gradients are those of ``cache="weight"``, and a kernel layer's backward never
    builds the float weight whole (row tiles)."""
    grads = {}
    for name in (cache, "weight"):
        model, _ = storage.load_quantized(folder, cache=name)
        emb = model.get_input_embeddings().weight
        emb.requires_grad_(True)
        x = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(2))
        model(x, labels=x).loss.backward()
        grads[name] = emb.grad.clone()
        assert all(m._layout is not None for m in packed_layers(model).values()) or name != "kernel"
    scale = grads["weight"].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(grads[cache], grads["weight"], rtol=0, atol=1e-4 * scale)


def packed_layers(model) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


@pytest.mark.parametrize("cache", ["kernel", "lanes", "compact"])
def test_kernel_generates_the_weight_cache_tokens(folder, cache):
    kernel, _ = storage.load_quantized(folder, cache=cache)
    weight, _ = storage.load_quantized(folder, cache="weight")
    x = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = kernel(x).logits, weight(x).logits
        # float32 rounding of a different summation order: a few eps of the logits' scale
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
        gen = {
            name: m.generate(x[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=2)
            for name, m in (("kernel", kernel), ("weight", weight))
        }
    assert torch.equal(gen["kernel"], gen["weight"])
    for layer in packed_layers(kernel).values():
        assert layer._layout is not None, "every layer ran the kernel"
        codes = [b for n, b in layer.named_buffers() if n.startswith("codes_")]
        assert codes and all(b.numel() == 0 for b in codes), "the layout replaced the codes"
        held = sum(b.numel() * b.element_size() for b in layer.buffers())
        assert layer.resident_nbytes() >= held + layer._layout.nbytes()


def test_kernel_model_saves_the_same_bytes(folder, tmp_path):
    """Loaded with "kernel", run (the codes now live in the layout only), saved again: every
    tensor of quantized.safetensors byte-identical; state_dict and dequantize as the codes model."""
    kernel, _ = storage.load_quantized(folder, cache="kernel")
    codes, _ = storage.load_quantized(folder, cache="codes")
    x = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        kernel(x)
    ref_state, got_state = codes.state_dict(), kernel.state_dict()
    assert sorted(ref_state) == sorted(got_state)
    for key, t in ref_state.items():
        assert torch.equal(got_state[key], t), key
    layers = packed_layers(kernel)
    for name, layer in packed_layers(codes).items():
        assert torch.equal(layers[name].dequantize(), layer.dequantize()), name
        assert layers[name].storage_nbytes == layer.storage_nbytes

    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    again = storage.save_packed(tmp_path / "again", kernel, None, layers, qconfig)
    before = load_file(folder / "quantized.safetensors")
    after = load_file(again / "quantized.safetensors")
    assert sorted(before) == sorted(after)
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key


def test_set_cache_switches_to_and_from_the_kernel(folder):
    model, _ = storage.load_quantized(folder, cache="codes")
    x = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(x).logits
        n = set_cache(model, "kernel")
        assert n == len(packed_layers(model))
        got = model(x).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
        layer = next(iter(packed_layers(model).values()))
        full = layer.storage_nbytes
        set_cache(model, "codes")  # the codes come back into their buffers
        assert layer._layout is None
        assert all(b.numel() > 0 for n, b in layer.named_buffers() if n.startswith("codes_"))
        assert layer.storage_nbytes == full
        assert torch.equal(model(x).logits, ref)


def test_compact_holds_radix_digits_in_less_memory_and_saves_the_same_codes():
    """``cache="compact"``: columns of 3, 5 and 10 levels as radix digits, the layer's memory
    below the "lanes" layout's, the same product to float32 rounding, and the saved codes back
    bitwise when the cache is switched; "kernel" (row lanes) below both."""
    gen = torch.Generator().manual_seed(7)
    levels = torch.tensor([3] * 400 + [5] * 300 + [10] * 200 + [16] * 50)
    levels = levels[torch.randperm(levels.numel(), generator=gen)]
    layer = _layer(256, levels.numel(), levels, gen)
    streams = {n: b.clone() for n, b in layer.named_buffers() if n.startswith("codes_")}
    x = torch.randn(2, levels.numel(), generator=gen)
    held = {}
    for cache in ("lanes", "compact", "kernel"):
        layer.set_cache(cache)
        with torch.inference_mode():
            y = layer(x)
        held[cache] = layer.resident_nbytes()
        assert layer._layout is not None
        if cache != "kernel":
            radix = set(layer._layout.runs[:, 3].tolist()) - {0}
            assert radix == ({3, 5, 10} if cache == "compact" else set())
        ref = torch.nn.functional.linear(x.double(), layer.dequantize().double())
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    # 3, 5 and 10 levels: 19, 13 and 9 codes a lane against 16, 10 and 8 (the kernel layout's
    # part-empty last block shared by two rows, lanes.py: 0.92 here)
    assert held["compact"] < 0.93 * held["lanes"]
    assert held["kernel"] < held["compact"]
    layer.set_cache("codes")
    for n, b in layer.named_buffers():
        if n.startswith("codes_"):
            assert torch.equal(b, streams[n])


@pytest.mark.parametrize("range_dtype", ["float16", "float32"])
def test_load_state_dict_into_a_kernel_layer(range_dtype):
    """New codes and ranges copied into a layer that ran: the kernel reads the new ones (the
    layer keeps views of its range buffers between forwards)."""
    gen = torch.Generator().manual_seed(4)
    layer = _layer(9, 40, torch.randint(2, 17, (40,), generator=gen), gen, range_dtype)
    other = _layer(9, 40, layer.packed.levels(), torch.Generator().manual_seed(5), range_dtype)
    assert not torch.equal(layer.lo_bits, other.lo_bits)
    layer.set_cache("kernel")
    x = torch.randn(3, 40, generator=gen)
    layer(x)
    assert layer._layout is not None
    layer.load_state_dict(other.state_dict())
    assert layer._layout is None  # rebuilt from the new codes at the next forward
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=1e-5)
    assert torch.equal(layer.dequantize(), other.dequantize())


def test_more_than_256_levels_and_non_cpu_inputs_run_as_codes(caplog):
    gen = torch.Generator().manual_seed(6)
    levels = torch.tensor([2, 300, 5, 1, 17] * 4)
    layer = _layer(7, 20, levels, gen)
    layer.set_cache("kernel")
    x = torch.randn(2, 20, generator=gen)
    with caplog.at_level(logging.INFO, logger="baq.saved.packed_linear"):
        y = layer(x)
        layer(x)
    assert layer._layout is None and layer._offsets is not None
    assert sum("runs it as 'codes'" in r.getMessage() for r in caplog.records) == 1
    ref = torch.nn.functional.linear(x.double(), layer.dequantize().double())
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)
    if torch.cuda.is_available():
        small = _layer(7, 20, torch.tensor([2, 3, 5, 1, 17] * 4), gen).to("cuda")
        small.set_cache("kernel")
        small(x.cuda())
        assert small._layout is None and small._offsets is not None


def _layer(rows: int, cols: int, levels: torch.Tensor, gen: torch.Generator,
           range_dtype: str = "float16") -> PackedLinear:  # fmt: skip
    W = torch.randn(rows, cols, generator=gen)
    grid = fit_grid(W, group_size=None, sym=False, range_dtype=range_dtype)
    codes = (torch.rand(rows, cols, generator=gen) * levels).long()
    res = QuantResult(weight=None, codes=codes, grid=grid, levels=levels, losses=torch.zeros(cols))
    return PackedLinear.from_quantized(res)


@pytest.mark.parametrize("cache", ["kernel", "codes"])
def test_building_a_cache_returns_the_freed_unpacked_codes(monkeypatch, cache):
    """The build unpacks int64 codes and frees them; the layer asks the C library to give the
    freed pages back (glibc keeps them otherwise: 918 against 649 MB of RSS on the reference
    model, session 21), once per build."""
    from baq.saved import load_memory

    calls = []
    monkeypatch.setattr(load_memory, "_malloc_trim", lambda: lambda pad: calls.append(pad))
    gen = torch.Generator().manual_seed(5)
    levels = torch.randint(2, 20, (40,), generator=gen)
    layer = _layer(32, 40, levels, gen)
    layer.set_cache(cache)
    with torch.inference_mode():
        layer(torch.randn(2, 40, generator=gen))
        layer(torch.randn(2, 40, generator=gen))
    assert calls == [0]

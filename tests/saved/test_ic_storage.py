"""Per-IC layers in the packed format (version 2): forward, save/load, version 1 folders."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from baq.config import QuantConfig
from baq.quant.gptq import rtn_solve
from baq.saved import manifest, storage
from baq.saved.packed_linear import PackedLinear, storage_bits_of
from helpers import ids, make_tiny_llama, make_tokenizer, quantize_all


def ic_result(rows, cols, group, sym, top=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g) * 4
    levels = torch.randint(1, top, (cols,), generator=g)
    return rtn_solve(W, levels, group, sym, dim="ic")


@pytest.mark.parametrize("group", [None, 8, 13], ids=["column", "rows8", "rows13-ragged"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("top", [40, 300], ids=["int8", "int16"])
def test_codes_forward_equals_the_dequantized_forward(group, sym, top):
    res = ic_result(45, 70, group, sym, top)
    bias = torch.randn(45)
    layer = PackedLinear.from_quantized(res, bias, cache="codes")
    assert torch.equal(layer.dequantize(), res.weight)  # codes and ranges in the layer: exact
    x = torch.randn(2, 9, 70)
    expected = F.linear(x.double(), res.weight.double(), bias.double())
    got = layer(x)
    assert got.shape == (2, 9, 45)
    scale = expected.abs().max()
    assert (got.double() - expected).abs().max() <= 1e-5 * scale
    assert layer.offset_codes().offsets.dtype == (torch.int8 if top <= 129 else torch.int16)


def test_storage_bits_count_every_per_ic_range():
    rows, cols, group = 45, 70, 8
    res = ic_result(rows, cols, group, False)
    layer = PackedLinear.from_quantized(res)
    ngroups = -(-rows // group)
    ranges = layer.lo_bits.numel() * layer.lo_bits.element_size() * 2
    assert tuple(layer.lo_bits.shape) == (ngroups, cols)
    assert ranges == 2 * 2 * ngroups * cols  # lo and hi, float16 each
    assert layer.storage_nbytes == layer.packed.nbytes() + ranges
    assert storage_bits_of({"x": res}) == pytest.approx(layer.storage_bits, abs=1e-12)


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(method="gptq", bits=3, dim="ic", group_size=24),
        QuantConfig(allocation="layer", method="baq", bits=2.5, dim="auto"),
    ],
    ids=["gptq-ic-g24", "baq-auto"],
)
def test_per_ic_save_and_load_is_bit_exact(cfg, tmp_path):
    model = make_tiny_llama()
    results = quantize_all(model, cfg)
    out = storage.save_quantized(tmp_path / "q", model, make_tokenizer(), results, cfg)
    rows = {r["name"]: r for r in manifest.inspect_quantized(out)}
    for cache in ("none", "codes"):
        loaded, _ = storage.load_quantized(out, cache=cache)
        mods = dict(loaded.named_modules())
        for name, res in results.items():
            layer = mods[name]
            assert layer.dim == res.grid.dim == rows[name]["dim"]
            assert torch.equal(layer.grid.lo, res.grid.lo) and torch.equal(
                layer.grid.hi, res.grid.hi
            )
            assert torch.equal(layer.dequantize(), res.weight)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits, rtol=0, atol=1e-5)
    if cfg.dim == "ic":
        assert all(r["dim"] == "ic" for r in rows.values())
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["format_version"] == 2
    )


def test_a_version_1_folder_still_loads(tmp_path, monkeypatch):
    """Today's writer with version 1 in its files is the version 1 format: per-OC layers have no
    ``dim`` key, and nothing else changed."""
    model = make_tiny_llama()
    cfg = QuantConfig(method="gptq", bits=3, group_size=16)
    results = quantize_all(model, cfg)
    monkeypatch.setattr(storage, "FORMAT_VERSION", 1)
    out = storage.save_quantized(tmp_path / "v1", model, make_tokenizer(), results, cfg)
    monkeypatch.undo()
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 1
    with safe_open(str(out / "quantized.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "1"
    assert all("dim" not in m for m in json.loads(meta["layers"]).values())
    loaded, _ = storage.load_quantized(out)
    mods = dict(loaded.named_modules())
    for name, res in results.items():
        assert mods[name].dim == "oc"
        assert torch.equal(mods[name].dequantize(), res.weight)


def test_a_version_1_file_cannot_hold_a_per_ic_layer(tmp_path):
    path = tmp_path / "x.safetensors"
    layers = {"a": {"shape": [4, 5], "group_size": None, "sym": False, "dim": "ic"}}
    meta = {"format": "baq", "format_version": "1", "layers": json.dumps(layers)}
    with pytest.raises(manifest.StorageError, match="dim 'ic'"):
        manifest.layers_meta(path, meta)

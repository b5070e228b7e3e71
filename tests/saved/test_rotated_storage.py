"""Rotated layers in the packed format (issue 27 item 2): ``N.rotation`` holds the seed, the
loaded :class:`PackedLinear` rebuilds the transform from it, applies it to its inputs in every
cache mode, and dequantizes to the original basis; folders without it read as before."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import baq
from baq.cli import main
from baq.config import WEIGHT_CACHES, QuantConfig
from baq.quant import rotation as rot
from baq.quant.grid import dequantize
from baq.quant.layer import quantize_layer
from baq.run.quantization import quantize_model
from baq.saved import manifest, storage
from baq.saved.packed_linear import PackedLinear, storage_bits_of
from baq.saved.storage import StorageError
from helpers import ids, make_tiny_llama, make_tokenizer, rehash_manifest

NAME = "blk.fc"


def rotated_result(cols=48, method="gptq", dim="oc"):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, cols, generator=g)
    X = torch.randn(cols, 3 * cols, generator=g)
    cfg = QuantConfig(method=method, bits=3, dim=dim, rotate=True)
    res, _ = quantize_layer(W, 2 * X @ X.T / X.shape[1], cfg, NAME)
    assert res.rotation is not None
    return res


@pytest.mark.parametrize("dim", ["oc", "ic"])
def test_packed_rotated_layer_against_the_dense_rotation(dim):
    res = rotated_result(dim=dim)
    bias = torch.randn(20)
    layer = PackedLinear.from_quantized(res, bias)
    R = rot.HadamardRotation(48, res.rotation).matrix()  # the dense float64 definition
    Wq_r = dequantize(res.codes, res.grid, res.levels)
    # the original basis, bitwise the weight the quantization pass wrote into the model
    assert torch.equal(layer.dequantize(), res.weight)
    torch.testing.assert_close(layer.dequantize().double(), Wq_r.double() @ R, rtol=0, atol=1e-5)
    assert torch.equal(layer.dequantize(rotated=True), Wq_r)  # the codes' own basis
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(layer.transform_input(x).double(), x.double() @ R.T,
                               rtol=0, atol=1e-5)  # fmt: skip
    expected = x.double() @ res.weight.double().T + bias.double()
    for cache in WEIGHT_CACHES:
        layer.set_cache(cache)
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (3, 5, 20)
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4, msg=cache)
        if cache == "weight":  # the original-basis weight applied to x itself: bitwise
            assert torch.equal(y, F.linear(x, res.weight, bias))
    with torch.no_grad():  # half inputs: rotated in float32, returned in their dtype
        y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), expected, rtol=0.05, atol=0.2)
    # the seed is all that is stored, and it is counted
    tensors = layer.file_tensors(NAME)
    assert torch.equal(tensors[f"{NAME}.rotation"], torch.tensor([res.rotation]))
    assert layer.storage_nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert layer.storage_bits == pytest.approx(storage_bits_of({NAME: res}), abs=1e-12)
    assert f"rotation_seed={res.rotation}" in repr(layer)


def test_an_unrotated_layer_has_the_identity_transform():
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(8, 16, generator=g), torch.randn(16, 40, generator=g)
    res, _ = quantize_layer(W, 2 * X @ X.T / 40, QuantConfig(method="gptq", bits=3, rotate=False))
    layer = PackedLinear.from_quantized(res)
    x = torch.randn(2, 16)
    assert layer.rotation is None and layer.rotation_seed is None
    assert layer.transform_input(x) is x
    assert f"{NAME}.rotation" not in layer.file_tensors(NAME)
    assert torch.equal(layer.dequantize(rotated=True), layer.dequantize())


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """A tiny Llama (tied head) quantized by the real pass with --rotate --include-head, saved."""
    model = make_tiny_llama()
    calib = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="gptq", bits=3, rotate=True, include_head=True)
    run = quantize_model(model, calib, cfg, device="cpu", progress=False)
    out = tmp_path_factory.mktemp("rotated") / "q"
    storage.save_quantized(out, model, make_tokenizer(), run.results, cfg)
    return out, model, run.results


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


@pytest.mark.parametrize("cache", WEIGHT_CACHES)
def test_saved_rotated_model_reloads_to_the_in_memory_model(rotated, cache):
    out, model, results = rotated
    assert all(res.rotation is not None for res in results.values())
    assert "lm_head" in results  # the head is rotated too; its tied embedding reads it
    loaded, _ = baq.load(out, cache=cache)
    mods = dict(loaded.named_modules())
    for name, res in results.items():
        assert mods[name].rotation_seed == res.rotation, name
        assert torch.equal(mods[name].dequantize(), res.weight), name
    assert torch.equal(loaded.get_input_embeddings().weight, results["lm_head"].weight)
    expected, got = logits(model), logits(loaded)
    if cache == "weight":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    prompt = ids()[:1, :4]
    want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), want)
    assert storage.storage_bits(out) == pytest.approx(storage_bits_of(results), abs=1e-12)


def test_rotated_folder_round_trips_through_transformers(rotated, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _, _ = rotated
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = logits(baq.load(out)[0])
    assert torch.equal(logits(model), expected)
    again = tmp_path / "again"
    model.save_pretrained(again)  # the packed head's tied embedding is checked and stored once
    got = (again / "quantized.safetensors").read_bytes()
    assert got == (out / "quantized.safetensors").read_bytes()


def test_inspect_shows_which_layers_are_rotated(rotated, capsys):
    """``baq inspect`` marks the layers whose codes are in a rotated basis (every width of the
    tiny model has a construction), from the folder's own ``N.rotation`` tensors."""
    out, _, results = rotated
    rows = manifest.inspect_quantized(out)
    assert {r["name"]: r["rotated"] for r in rows} == {
        name: res.rotation is not None for name, res in results.items()
    }
    assert all(r["rotated"] for r in rows)
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "rotated" in table[0].split()
    assert all(line.split()[4] == "yes" for line in table[1:-1])
    assert table[-1].endswith(f"; {len(rows)} rotated (--rotate)")


def test_a_folder_without_rotation_tensors_reads_as_before(tmp_path):
    """What every folder written before rotation holds: no N.rotation, no transform."""
    model = make_tiny_llama()
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="gptq", bits=3, rotate=False)  # as before rotation existed
    run = quantize_model(model, calib, cfg, device="cpu", progress=False)
    out = storage.save_quantized(tmp_path / "q", model, make_tokenizer(), run.results, cfg)
    assert not any(k.endswith(".rotation") for k in load_file(out / "quantized.safetensors"))
    loaded, _ = baq.load(out, cache="weight")
    layers = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.rotation is None for m in layers)
    assert torch.equal(logits(loaded), logits(model))


def edit_rotation(src, tmp_path, value):
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    path = out / "quantized.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.rotation"
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, str(path), metadata=meta)
    rehash_manifest(out, "quantized.safetensors")
    return out


@pytest.mark.parametrize(
    "value, match",
    [
        (torch.tensor([5], dtype=torch.int32), "rotation is int32 with shape"),
        (torch.tensor([1, 2]), r"rotation is int64 with shape \(2,\)"),
        (torch.tensor([-3]), "holds the seed -3"),
    ],
    ids=["int32", "two-seeds", "negative"],
)
def test_a_bad_rotation_tensor_is_one_line(rotated, tmp_path, value, match):
    out = edit_rotation(rotated[0], tmp_path, value)
    with pytest.raises(StorageError, match=match) as err:
        baq.load(out)
    assert "\n" not in str(err.value) and "q_proj.rotation" in str(err.value)


def test_a_rotation_tensor_removed_gives_other_logits_not_an_error(rotated, tmp_path):
    """The seed is the layer's basis: without it the codes apply to unrotated inputs (what a
    reader from before rotation would do, had it not refused the unknown tensor)."""
    out = edit_rotation(rotated[0], tmp_path, None)
    loaded, _ = baq.load(out)
    assert loaded.model.layers[0].self_attn.q_proj.rotation is None
    assert not torch.allclose(logits(loaded), logits(baq.load(rotated[0])[0]), atol=1e-3)


def test_sharded_rotated_save_keeps_each_seed_with_its_layer(rotated, tmp_path):
    """A packed layer is never split between shards: its seed travels with its codes."""
    out, model, results = rotated
    cfg = QuantConfig(method="gptq", bits=3, rotate=True, include_head=True)
    sharded = storage.save_quantized(
        tmp_path / "s", model, make_tokenizer(), results, cfg, max_shard_size="20KB"
    )
    shards = sorted(sharded.glob("quantized-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        tensors = load_file(shard)
        names = {k.removesuffix(".level_classes") for k in tensors if k.endswith(".level_classes")}
        assert {k.removesuffix(".rotation") for k in tensors if k.endswith(".rotation")} == names
    loaded, _ = baq.load(sharded, cache="weight")
    assert torch.equal(logits(loaded), logits(model))


def test_export_of_a_rotated_folder_is_the_original_basis_model(rotated, tmp_path):
    """baq export writes W' R: a plain transformers model with the quantized model's logits."""
    from transformers import AutoModelForCausalLM

    from baq.saved.export import export_dequantized

    out, model, results = rotated
    dense = export_dequantized(out, tmp_path / "dense", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(dense)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(plain.get_submodule(name).weight, results[name].weight)
    assert torch.equal(logits(plain), logits(model))

"""Memory a saved folder asks for at load (issue 29, defect 4): estimated from the headers, checked
against the available memory, and shapes checked against config.json, before anything is
allocated."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import baq
from baq.cli import main
from baq.config import WEIGHT_CACHES, QuantConfig
from baq.saved import load_memory, loading, storage
from baq.saved.manifest import (
    DENSE_FILE,
    QUANTIZED_FILE,
    StorageError,
    merged_info,
    packed_layers,
    verify_manifest,
    weight_headers,
)
from baq.saved.packed_linear import PackedLinear
from baq.saved.packing import pack_columns
from helpers import ids, make_tiny_llama, make_tokenizer, quantize_all, rehash_manifest

GIB = 1 << 30
HUGE_VOCAB = 10_000_000  # x 64 hidden: 2.4 GiB of float32 embedding, from a folder of ~100 KB


def _packed_head_folder(folder):
    """A tiny Llama whose tied head is packed per input channel with one level in every column:
    the head stores 8 + 4 * 64 bytes whatever its vocabulary, and the embedding tied to it is
    its dequantized weight (docs/FORMAT.md, section 2)."""
    model = make_tiny_llama()
    cfg = QuantConfig(method="gptq", bits=3)
    results = quantize_all(model, cfg)
    storage.save_quantized(folder, model, make_tokenizer(), results, cfg)
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    packed = {n: PackedLinear.from_quantized(r) for n, r in results.items()}
    vocab, hidden = model.lm_head.weight.shape
    codes = pack_columns(torch.zeros(vocab, hidden, dtype=torch.long), torch.ones(hidden).long())
    lo, hi = -torch.ones(1, hidden), torch.ones(1, hidden)
    packed["lm_head"] = PackedLinear(codes, lo, hi, None, False, None, "none", "ic")
    storage.save_packed(folder, model, make_tokenizer(), packed, qconfig, force=True)
    return folder


def _claim_vocab(folder, vocab, head_too=True):
    """Edit config.json (and the packed head's shape) to a vocabulary of ``vocab``, hashes
    recorded as an attacker would."""
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = vocab
    (folder / "config.json").write_text(json.dumps(config))
    rehash_manifest(folder, "config.json")
    if head_too:
        path = folder / QUANTIZED_FILE
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n))["__metadata__"]
        layers = json.loads(meta["layers"])
        layers["lm_head"]["shape"][0] = vocab
        meta["layers"] = json.dumps(layers)
        save_file(load_file(path), str(path), metadata=meta)
        rehash_manifest(folder, QUANTIZED_FILE)


@pytest.fixture(scope="module")
def head_folder(tmp_path_factory):
    return _packed_head_folder(tmp_path_factory.mktemp("mem") / "head")


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Fail if a load reads weights or dequantizes before refusing."""

    def boom(*a, **k):
        raise AssertionError("weights read or dequantized before the folder was refused")

    monkeypatch.setattr(loading, "_load_tensors", boom)
    monkeypatch.setattr(PackedLinear, "dequantize", boom)


def _available(monkeypatch, nbytes):
    monkeypatch.setattr(load_memory, "available_bytes", lambda: nbytes)


def _estimates(folder, dtype_size=None):
    m = verify_manifest(folder)
    qh = weight_headers(folder, QUANTIZED_FILE, m["files"])
    dense = merged_info(weight_headers(folder, DENSE_FILE, m["files"]))
    layers = packed_layers(folder, qh)
    return {
        c: load_memory.estimate_load(layers, merged_info(qh), dense, m["tied"], c, dtype_size)
        for c in WEIGHT_CACHES
    }


def test_a_tiny_folder_claiming_a_huge_vocabulary_is_refused_before_allocating(
    head_folder, tmp_path, monkeypatch, nothing_allocated, capsys
):
    import shutil

    folder = tmp_path / "claims"
    shutil.copytree(head_folder, folder)
    _claim_vocab(folder, HUGE_VOCAB)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 200_000
    _available(monkeypatch, 2 * GIB)
    pattern = (
        rf"{folder}: loading with cache 'codes' needs about [\d.]+ GiB \(.*tied 2\.38.*\), "
        r"2\.00 GiB is available: load it on a machine with more memory"
    )
    with pytest.raises(StorageError, match=pattern):
        baq.load(folder, cache="codes")
    with pytest.raises(StorageError, match="GiB is available"):
        AutoModelForCausalLM.from_pretrained(folder)
    argv = ["eval", str(folder), "--eval", "builtin", "--eval-windows", "1", "--cache", "codes"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2.00 GiB is available" in err[0]
    # the estimate holds at least the tied embedding (float32) and the codes cache's byte each
    est = _estimates(folder)["codes"]
    assert est.tied == HUGE_VOCAB * 64 * 4 and est.cache >= HUGE_VOCAB * 64
    assert est.total > 40 * HUGE_VOCAB * 64  # the head is unpacked once, as int64 and float32


def test_a_config_that_disagrees_with_the_stored_shapes_is_refused_before_allocating(
    head_folder, tmp_path, nothing_allocated
):
    import shutil

    packed_head = tmp_path / "head"
    shutil.copytree(head_folder, packed_head)
    _claim_vocab(packed_head, HUGE_VOCAB, head_too=False)
    with pytest.raises(StorageError, match=r"layer lm_head has shape \(512, 64\), the model "):
        baq.load(packed_head)

    plain = tmp_path / "plain"  # the head not packed: the embedding is in model.safetensors
    model = make_tiny_llama()
    cfg = QuantConfig(method="gptq", bits=3)
    storage.save_quantized(plain, model, None, quantize_all(model, cfg), cfg)
    _claim_vocab(plain, HUGE_VOCAB, head_too=False)
    pattern = (
        r"model\.safetensors: tensor model\.embed_tokens\.weight has shape \(512, 64\), "
        rf"config\.json gives \({HUGE_VOCAB}, 64\)"
    )
    with pytest.raises(StorageError, match=pattern):
        baq.load(plain)
    with pytest.raises(StorageError, match=pattern):
        AutoModelForCausalLM.from_pretrained(plain)


def test_the_estimate_is_what_a_loaded_model_holds(head_folder):
    """Each part against the tensors a real load holds after one forward per cache."""
    dense = load_file(head_folder / DENSE_FILE)
    for cache in ("codes", "weight", "none"):
        est = _estimates(head_folder)[cache]
        model, _ = baq.load(head_folder, cache=cache)
        with torch.no_grad():
            model(ids())
        layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
        stored = sum(
            b.numel() * b.element_size()
            for m in layers
            for n, b in m.named_buffers()
            if n != "bias"
        )
        assert est.packed == stored
        assert est.dense == sum(t.numel() * t.element_size() for t in dense.values())
        emb = model.get_input_embeddings().weight
        assert est.tied == emb.numel() * emb.element_size()
        if cache == "codes":
            held = sum(m._offsets.nbytes() for m in layers)
        elif cache == "weight":
            held = sum(m._weight.numel() * m._weight.element_size() for m in layers)
        else:
            held = 0
        held += sum(0 if m.rotation is None else m.rotation.nbytes() for m in layers)
        assert est.cache == held, cache
        assert est.transient == 40 * max(m.out_features * m.in_features for m in layers)


def test_a_cache_that_fits_is_suggested(head_folder, monkeypatch, nothing_allocated):
    est = _estimates(head_folder)
    between = (est["none"].total + est["weight"].total) // 2
    _available(monkeypatch, between)
    with pytest.raises(StorageError, match=r"another cache \(.*--cache none.*\)") as err:
        baq.load(head_folder, cache="weight")
    assert "--cache weight" not in str(err.value)


def test_a_cast_is_counted_in_its_dtype(head_folder):
    stored, half = _estimates(head_folder)["codes"], _estimates(head_folder, 2)["codes"]
    dense = load_file(head_folder / DENSE_FILE)
    floats = sum(t.numel() for t in dense.values() if t.is_floating_point())
    assert half.dense == stored.dense + 2 * floats  # the float16 copy beside the float32 one
    assert half.tied * 2 == stored.tied

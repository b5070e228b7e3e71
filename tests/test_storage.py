import errno
import json
import math
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from baq.config import QuantConfig
from baq.quant.grid import nominal_bits
from baq.quant.layer import quantize_layer
from baq.saved import storage
from baq.saved.storage import PackedLinear, StorageError
from helpers import (
    ids,
    make_tiny_gpt2,
    make_tiny_llama,
    make_tokenizer,
    quantize_all,
    rehash_manifest,
)


def data_bytes(path) -> int:
    """Tensor-data bytes of a safetensors file: its size minus the 8-byte length and the header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


CFGS = [
    QuantConfig(method="rtn", bits=4),
    QuantConfig(method="gptq", bits=3),
    QuantConfig(method="gptq", bits=2, group_size=16, act_order=True),
    QuantConfig(allocation="layer", method="baq", bits=2.5),
    QuantConfig(allocation="layer", method="baq", bits=3, group_size=24, act_order=True, sym=True),
    QuantConfig(allocation="layer", method="baq", bits=2, integer_bits=True),
    QuantConfig(allocation="layer", method="baq", bits=2.5, group_size=16, range_dtype="float32"),
    QuantConfig(method="rtn", bits=3, dim="ic", group_size=24),
    QuantConfig(method="gptq", bits=3, dim="ic", group_size=16, act_order=True),
    QuantConfig(allocation="layer", method="baq", bits=2.5, dim="ic", sym=True),
]
CFG_IDS = [
    "rtn4",
    "gptq3",
    "gptq2-g16-act",
    "baq2.5",
    "baq3-g24-act-sym",
    "baq2-int",
    "baq2.5-g16-f32ranges",
    "rtn3-ic-g24",
    "gptq3-ic-g16-act",
    "baq2.5-ic-sym",
]


@pytest.mark.parametrize("cfg", CFGS, ids=CFG_IDS)
@pytest.mark.parametrize("build", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_reload_gives_the_in_memory_quantized_logits(build, cfg, tmp_path):
    model = build()
    results = quantize_all(model, cfg)
    out = storage.save_quantized(tmp_path / "q", model, make_tokenizer(), results, cfg)
    loaded, tok = storage.load_quantized(out)

    mods = dict(loaded.named_modules())
    for name, res in results.items():
        layer = mods[name]
        assert isinstance(layer, PackedLinear)
        # bitwise: the file reproduces exactly what the solver computed
        assert torch.equal(layer.dequantize(), res.weight), name
    x = ids()
    with torch.no_grad():
        expected, got = model(x).logits, loaded(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert storage.storage_bits(out) == pytest.approx(storage.storage_bits_of(results), abs=1e-12)
    assert tok is not None and tok.get_vocab() == make_tokenizer().get_vocab()
    gen = loaded.generate(x[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A GPTQ 3-bit tiny Llama saved once; tests corrupt copies of it."""
    model = make_tiny_llama()
    cfg = QuantConfig(method="gptq", bits=3)
    results = quantize_all(model, cfg)
    out = tmp_path_factory.mktemp("saved") / "q"
    storage.save_quantized(out, model, make_tokenizer(), results, cfg, {"ppl": float("nan")})
    return out, model, results


@pytest.fixture
def copy(saved, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(saved[0], out)
    return out


def _load_error(folder, match) -> str:
    with pytest.raises(StorageError, match=match) as info:
        storage.load_quantized(folder)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_quantization_config_and_manifest(saved):
    out, _, results = saved
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "baq" and qc["format_version"] == storage.FORMAT_VERSION
    assert (qc["method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", 3, None, False)
    assert qc["nominal_bits"] == pytest.approx(3.0)
    assert qc["storage_bits"] == pytest.approx(storage.storage_bits(out))
    assert qc["summary"] == {"ppl": None} and qc["quantized_modules"] == len(results)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert {"config.json", "model.safetensors", "quantized.safetensors", "tokenizer.json"} <= set(
        manifest["files"]
    )
    # everything not quantized is stored as it was; tied weights once; no packed weight twice
    dense = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in dense and "model.embed_tokens.weight" in dense
    assert not any(f"{name}.weight" in dense for name in results)


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(method="rtn", bits=4),
        QuantConfig(method="rtn", bits=2, group_size=16),
        QuantConfig(method="gptq", bits=3, group_size=24),
        QuantConfig(allocation="layer", method="baq", bits=3, integer_bits=True),
        QuantConfig(method="rtn", bits=3, group_size=16, range_dtype="float32"),
    ],
    ids=["rtn4", "rtn2-g16", "gptq3-g24-ragged", "baq3-int", "rtn3-g16-f32ranges"],
)
def test_storage_rate_is_file_bytes_and_nominal_plus_documented_overhead(cfg, tmp_path):
    model = make_tiny_llama()
    results = quantize_all(model, cfg)
    out = storage.save_quantized(tmp_path / "q", model, None, results, cfg)
    weights = sum(r.codes.numel() for r in results.values())
    from_file = data_bytes(out / "quantized.safetensors") * 8 / weights
    assert storage.storage_bits(out) == from_file
    rows_ = storage.inspect_quantized(out)
    assert sum(r["bytes"] for r in rows_) * 8 / weights == from_file

    # docs/FORMAT.md section 9, power-of-two levels: codes at exactly log2 L bits, plus ranges
    # (2 x 16 bits per row and group, 2 x 32 for float32 ranges), the 64-bit level table row per
    # class, the int16 permutation when the level counts are not already ascending, and the
    # 64-bit seed of a rotated layer (BAQ and GPTQ rotate by default)
    range_bits = 16 if cfg.range_dtype == "float16" else 32
    overhead = 0
    for row, (name, res) in zip(rows_, results.items()):
        rows, cols = res.codes.shape
        G = 1 if cfg.group_size is None else math.ceil(cols / cfg.group_size)
        levels = res.levels
        assert row["name"] == name and row["shape"] == (rows, cols)
        assert row["nominal_bits"] == pytest.approx(nominal_bits(levels), abs=1e-12)
        assert row["levels"] == {
            int(L): int((levels == L).sum()) for L in torch.unique(levels).tolist()
        }
        sorted_ = bool((levels[1:] >= levels[:-1]).all())
        overhead += 2 * range_bits * rows * G + 64 * len(row["levels"])
        overhead += 0 if sorted_ else 16 * cols
        overhead += 0 if res.rotation is None else 64
    nominal = sum(nominal_bits(r.levels) * r.codes.numel() for r in results.values()) / weights
    assert from_file == pytest.approx(nominal + overhead / weights, abs=1e-12)
    if cfg.method != "baq":
        assert from_file == pytest.approx(cfg.bits + overhead / weights, abs=1e-12)


def test_random_576x1536_layer_rates_documented(tmp_path):
    """The reply's table: a random SmolLM2-sized layer at 2, 3, 4 bits (BAQ, per row)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(576, 1536, generator=g) * 0.02
    X = torch.randn(1536, 512, generator=g) * torch.rand(1536, 1, generator=g) * 3
    H = 2 * X @ X.T / X.shape[1]
    for bits in (2, 3, 4):
        res, rec = quantize_layer(
            W, H, QuantConfig(allocation="layer", method="baq", bits=bits, sensitivity="analytic")
        )
        rate = storage.storage_bits_of({"w": res})
        # the exact budget is met within the granularity of one column
        assert rec.nominal_bits == pytest.approx(bits, abs=1 / W.shape[1])
        # radix for non-power-of-two levels costs a few percent over log2 L, ranges 0.02 bits
        assert bits < rate < bits * 1.08 + 0.05


def test_flipped_byte_is_reported(copy):
    path = copy / "quantized.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _load_error(copy, r"quantized\.safetensors: SHA-256 differs from manifest\.json")
    with pytest.raises(StorageError, match="SHA-256"):
        storage.storage_bits(copy)
    with pytest.raises(StorageError, match="SHA-256"):
        storage.inspect_quantized(copy)


def test_truncated_file_is_reported(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _load_error(copy, r"model\.safetensors: \d+ bytes, manifest\.json says \d+: truncated")


@pytest.mark.parametrize("rel", ["tokenizer.json", "config.json", "quantized.safetensors"])
def test_missing_file_is_reported(copy, rel):
    (copy / rel).unlink()
    _load_error(copy, rf"{rel}: missing \(listed in manifest\.json\)")


def test_missing_manifest_means_not_a_complete_save(copy):
    (copy / "manifest.json").unlink()
    _load_error(copy, r"manifest\.json: missing")


def test_wrong_format_version_is_reported(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _load_error(copy, r"manifest\.json: format version 99 is not supported: .* reads versions 1, 2")


def test_wrong_version_in_config_is_reported(copy):
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (copy / "config.json").write_text(json.dumps(config))
    _load_error(copy, r"config\.json: (SHA-256 differs|\d+ bytes, manifest\.json says)")
    rehash_manifest(copy, "config.json")
    _load_error(copy, r"config\.json: format version 3 is not supported")


def test_hand_edited_manifest_is_reported(copy):
    (copy / "manifest.json").write_text("{not json")
    _load_error(copy, r"manifest\.json: not readable JSON")


def test_hand_edited_tensors_with_matching_hashes_are_caught(copy):
    path = copy / "quantized.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    name = "model.layers.0.self_attn.q_proj"
    tensors[f"{name}.lo"] = tensors[f"{name}.lo"][:-1].clone()
    save_file(tensors, str(path), metadata=meta)
    rehash_manifest(copy, "quantized.safetensors")
    _load_error(copy, rf"quantized\.safetensors: tensor {name}\.lo has shape \(63, 1\)")

    tensors = load_file(path)
    tensors[f"{name}.lo"] = torch.cat([tensors[f"{name}.lo"], tensors[f"{name}.lo"][:1]])
    tensors["model.layers.0.extra"] = torch.zeros(2)
    save_file(tensors, str(path), metadata=meta)
    rehash_manifest(copy, "quantized.safetensors")
    _load_error(copy, r"unexpected tensor model\.layers\.0\.extra")


def test_existing_target_is_refused_and_force_replaces_it(saved, tmp_path):
    out, model, results = saved
    target = tmp_path / "q"
    cfg = QuantConfig(method="gptq", bits=3)
    storage.save_quantized(target, model, None, results, cfg)
    with pytest.raises(StorageError, match="already exists: pass force=True"):
        storage.save_quantized(target, model, None, results, cfg)
    rtn = QuantConfig(method="rtn", bits=4)
    storage.save_quantized(target, model, None, results, rtn, force=True)
    assert (
        json.loads((target / "config.json").read_text())["quantization_config"]["method"] == "rtn"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp or old folder left
    storage.verify_manifest(target)

    other = tmp_path / "not-a-save"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(StorageError, match="not a baq model folder"):
        storage.save_quantized(other, model, None, results, cfg, force=True)
    assert (other / "notes.txt").read_text() == "keep me"


def _failing_writer(exc):
    def write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise exc

    return write


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("injected"), OSError(errno.ENOSPC, "No space left on device")],
    ids=["exception", "disk-full"],
)
def test_failed_save_leaves_no_target_and_no_temp(saved, tmp_path, monkeypatch, exc):
    _, model, results = saved
    cfg = QuantConfig(method="gptq", bits=3)
    monkeypatch.setattr(storage, "save_file", _failing_writer(exc))
    if isinstance(exc, OSError):
        with pytest.raises(StorageError, match=r"cannot save .*q: No space left on device$"):
            storage.save_quantized(tmp_path / "q", model, None, results, cfg)
    else:
        with pytest.raises(RuntimeError, match="injected"):
            storage.save_quantized(tmp_path / "q", model, None, results, cfg)
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_save_keeps_the_previous_one(saved, tmp_path, monkeypatch):
    out, model, results = saved
    target = tmp_path / "q"
    shutil.copytree(out, target)
    monkeypatch.setattr(storage, "save_file", _failing_writer(RuntimeError("injected")))
    with pytest.raises(RuntimeError):
        storage.save_quantized(target, model, None, results, QuantConfig(), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    storage.verify_manifest(target)


def test_packed_linear_cache_dtype_and_repr(saved):
    out, model, results = saved
    plain, _ = storage.load_quantized(out, cache="none")
    cached, _ = storage.load_quantized(out, cache="weight")
    coded, _ = storage.load_quantized(out)  # the default
    x = ids()
    with torch.inference_mode():
        a = plain(x).logits
        b = cached(x).logits
        c = cached(x).logits
        d = coded(x).logits
    assert torch.equal(b, c)
    # "none" multiplies the rotated input by the rotated-basis weight, "weight" the input by the
    # weight taken back to the original basis: equal up to float32 rounding
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
    torch.testing.assert_close(d, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    q = cached.model.layers[0].self_attn.q_proj
    assert q._weight is not None and plain.model.layers[0].self_attn.q_proj._weight is None
    assert coded.model.layers[0].self_attn.q_proj._layout is not None  # the default: kernel
    assert "nominal_bits=3.000" in repr(q) and "storage_bits=" in repr(q)
    with pytest.raises(ValueError, match="cache='all'"):
        storage.load_quantized(out, cache="all")

    name = "model.layers.0.mlp.down_proj"
    layer = dict(plain.named_modules())[name]
    plain.to(torch.bfloat16)  # the float16 ranges must not be rounded by a dtype cast
    assert torch.equal(layer.dequantize(), results[name].weight)
    half, _ = storage.load_quantized(out, dtype="bfloat16")
    assert half.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(half(x).logits.float()).all()

    direct = PackedLinear.from_quantized(results[name])
    assert torch.equal(direct.dequantize(), results[name].weight)
    assert direct.storage_bits == pytest.approx(storage.storage_bits_of({name: results[name]}))


def test_cli_generate_on_a_saved_folder_matches_the_in_memory_model(saved, capsys):
    from baq.cli import main

    out, model, _ = saved
    tok = make_tokenizer()
    prompt = "the value of the"
    x = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**x, max_new_tokens=6, do_sample=False, pad_token_id=2)
    expected = prompt + tok.decode(ref[0, x["input_ids"].shape[1] :], skip_special_tokens=True)
    assert main(["generate", str(out), prompt, "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


@pytest.mark.parametrize("cache", ["none", "codes", "weight"])
def test_cli_eval_on_a_saved_folder_matches_the_in_memory_model(saved, tmp_path, capsys, cache):
    from pydoc_data.topics import topics

    from baq import data
    from baq.cli import main
    from baq.eval import scoring

    out, model, _ = saved
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(topics[k] for k in sorted(topics))[:20_000])
    windows = data.eval_windows(data.tokenize(make_tokenizer(), text.read_text()), 32, 3)
    expected = scoring.perplexity(model, windows, "cpu")
    argv = ["eval", str(out), "--eval", str(text), "--eval-seqlen", "32", "--eval-windows", "3"]
    assert main([*argv, "--cache", cache, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"perplexity {text}: ")
    assert float(printed.split(": ")[1]) == pytest.approx(expected, rel=1e-4)


def test_cli_inspect_table_matches_the_files(saved, capsys):
    from baq.cli import main

    out, _, results = saved
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert len(text) == 1 + len(results) + 1  # header, one line per layer, totals
    assert {line.split()[0] for line in text[1:-1]} == set(results)
    nominal = sum(
        res.codes.shape[0] * float(torch.log2(res.levels.double()).sum())
        for res in results.values()
    ) / sum(res.codes.numel() for res in results.values())
    assert f"{nominal:.3f} nominal, {storage.storage_bits(out):.3f} storage" in text[-1]


@pytest.mark.parametrize("command", [["inspect"], ["generate", "--max-new-tokens", "2"]])
def test_cli_on_a_corrupted_folder_is_one_line_exit_2(copy, capsys, command):
    from baq.cli import main

    path = copy / "quantized.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    argv = [command[0], str(copy), *(["hello"] if command[0] == "generate" else []), *command[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized.safetensors" in err[0] and "truncated" in err[0]


def test_float32_ranges_are_stored_in_float32(tmp_path):
    cfg = QuantConfig(method="gptq", bits=3, range_dtype="float32")
    model = make_tiny_llama()
    results = quantize_all(model, cfg)
    # the solver kept ranges that float16 cannot hold: the file must not round them
    assert any(not torch.equal(r.grid.lo, r.grid.lo.half().float()) for r in results.values())
    out = storage.save_quantized(tmp_path / "q", model, None, results, cfg)
    tensors = load_file(out / "quantized.safetensors")
    for name, res in results.items():
        assert tensors[f"{name}.lo"].dtype == tensors[f"{name}.hi"].dtype == torch.float32
        assert torch.equal(tensors[f"{name}.lo"], res.grid.lo)
    loaded, _ = storage.load_quantized(out)
    mods = dict(loaded.named_modules())
    assert all(torch.equal(mods[n].dequantize(), r.weight) for n, r in results.items())

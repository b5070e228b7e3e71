"""baq export: a saved folder as a plain Hugging Face folder of dequantized weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import baq
from baq.cli import main
from baq.config import QuantConfig
from baq.eval.scoring import perplexity
from baq.model import blocks
from baq.saved import storage
from baq.saved.export import export_dequantized
from baq.saved.packed_linear import PackedLinear
from helpers import ids, make_tiny_gpt2, make_tiny_llama, make_tokenizer, quantize_all

BUILDS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


def saved(folder, build="llama"):
    model = BUILDS[build]()
    cfg = QuantConfig(allocation="layer", method="baq", bits=2.5, group_size=16)
    results = quantize_all(model, cfg)
    storage.save_quantized(folder, model, make_tokenizer(), results, cfg)
    return results


@pytest.mark.parametrize("build", list(BUILDS))
def test_float32_export_is_the_dequantized_model(build, tmp_path, capsys):
    results = saved(tmp_path / "q", build)
    out = tmp_path / "x"
    assert main(["export", str(tmp_path / "q"), "--dtype", "float32", "--output", str(out)]) == 0
    assert not (out / "quantized.safetensors").exists() and not (out / "manifest.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    plain = AutoModelForCausalLM.from_pretrained(out)
    mods = dict(plain.named_modules())
    for name, res in results.items():
        assert isinstance(mods[name], (torch.nn.Linear, Conv1D)), name
        assert torch.equal(blocks.get_weight(mods[name]), res.weight), name
    packed, tok = baq.load(tmp_path / "q", cache="weight")
    with torch.no_grad():
        assert torch.equal(plain(ids()).logits, packed(ids()).logits)
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    windows = ids(3, 32)
    ppl_plain, ppl_packed = perplexity(plain, windows), perplexity(packed, windows)
    assert ppl_plain == pytest.approx(ppl_packed, rel=1e-4)


def test_float16_export_rounds_the_dequantized_weights(tmp_path):
    results = saved(tmp_path / "q")
    assert main(["export", str(tmp_path / "q"), "--output", str(tmp_path / "x")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "x", dtype=torch.float32)
    mods = dict(plain.named_modules())
    for name, res in results.items():
        # float16 storage, float32 compute: the weight is the float16 rounding of baq's weight
        assert torch.equal(mods[name].weight, res.weight.half().float()), name
    assert plain.get_input_embeddings().weight.dtype == torch.float32
    stored = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    assert stored.get_input_embeddings().weight.dtype == torch.float16


def test_model_dequantize_of_a_from_pretrained_model(tmp_path):
    results = saved(tmp_path / "q")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    model.dequantize()
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    mods = dict(model.named_modules())
    assert all(torch.equal(mods[n].weight, r.weight) for n, r in results.items())
    model.save_pretrained(tmp_path / "dense")  # the transformers way: no baq files
    assert not (tmp_path / "dense" / "manifest.json").exists()
    assert "quantization_config" not in json.loads((tmp_path / "dense/config.json").read_text())


def test_export_bad_input_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    saved(tmp_path / "q")

    def boom(*a, **k):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(storage, "load_quantized", boom)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    cases = [
        (["export", str(tmp_path), "--output", str(tmp_path / "x")], "not a saved baq model"),
        (["export", str(tmp_path / "q"), "--output", str(tmp_path / "taken")], "already exists"),
        (["export", str(tmp_path / "q"), "--output", str(tmp_path / "q")], "already exists"),
        (["export", str(tmp_path / "q"), "--dtype", "int8", "--output", "x"], "invalid choice"),
        (["export", str(tmp_path / "q")], "--output"),
    ]
    for argv, message in cases:
        assert _exit_code(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors (invalid choice, missing flag)
        return exc.code


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    saved(tmp_path / "q")
    from transformers import PreTrainedTokenizerFast

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full)
    with pytest.raises(storage.StorageError, match="No space left"):
        export_dequantized(tmp_path / "q", tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]

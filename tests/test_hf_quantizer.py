"""transformers' from_pretrained, save_pretrained and pipeline on saved baq folders."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import baq
from baq.config import QuantConfig
from baq.saved import storage
from baq.saved.packed_linear import PackedLinear
from baq.saved.storage import StorageError
from helpers import (
    ids,
    make_tiny_gpt2,
    make_tiny_llama,
    make_tokenizer,
    quantize_all,
    rehash_manifest,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

CFGS = {
    "gptq3": QuantConfig(method="gptq", bits=3),
    "baq2.5-g16-act": QuantConfig(
        allocation="layer", method="baq", bits=2.5, group_size=16, act_order=True
    ),
}
BUILDS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


def save(folder, build="llama", cfg="gptq3", summary=None):
    model = BUILDS[build]()
    results = quantize_all(model, CFGS[cfg])
    storage.save_quantized(folder, model, make_tokenizer(), results, CFGS[cfg], summary)
    return model, results


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "q"
    save(out)
    return out


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


@pytest.mark.parametrize("cfg", list(CFGS))
@pytest.mark.parametrize("build", list(BUILDS))
def test_from_pretrained_gives_baq_loads_logits_bit_exactly(build, cfg, tmp_path):
    original, results = save(tmp_path / "q", build, cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    reference, _ = baq.load(tmp_path / "q")
    mods = dict(model.named_modules())
    for name, res in results.items():
        assert isinstance(mods[name], PackedLinear), name
        assert torch.equal(mods[name].dequantize(), res.weight), name
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert torch.equal(logits(model), logits(reference))
    # and the in-memory quantized model, up to the codes cache's float rounding
    torch.testing.assert_close(logits(model), logits(original), rtol=0, atol=1e-5)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("kwargs", [{"dtype": torch.float16}, {"device_map": "auto"}, {}])
def test_dtype_and_device_map(folder, kwargs):
    pytest.importorskip("accelerate")
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    reference, _ = baq.load(folder, dtype=kwargs.get("dtype"))
    assert model.get_input_embeddings().weight.dtype == kwargs.get("dtype", torch.float32)
    assert torch.equal(logits(model), logits(reference))


def test_set_cache_switches_every_packed_layer_and_keeps_the_logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    codes = logits(model)
    assert {m.cache for m in layers} == {"kernel"} and all(m._layout is not None for m in layers)
    assert baq.set_cache(model, "weight") == len(layers) > 0
    assert all(m.cache == "weight" and m._offsets is None for m in layers)
    torch.testing.assert_close(logits(model), codes, rtol=1e-4, atol=1e-4)
    assert all(m._weight is not None for m in layers)  # kept between forwards
    baq.set_cache(model, "none")
    torch.testing.assert_close(logits(model), codes, rtol=1e-4, atol=1e-4)
    assert all(m._weight is None and m._offsets is None for m in layers)
    with pytest.raises(ValueError, match="cache='float'"):
        baq.set_cache(model, "float")
    assert {m.cache for m in layers} == {"none"}  # a refused name changes nothing


def test_save_pretrained_round_trip_reads_back_bit_exactly_by_both_loaders(folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder)
    expected = logits(model)
    again = tmp_path / "again"
    model.save_pretrained(again)
    assert (again / "manifest.json").is_file()
    # the packed file is the very same bytes; the unquantized tensors the same values
    assert (again / "quantized.safetensors").read_bytes() == (
        folder / "quantized.safetensors"
    ).read_bytes()
    old, new = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    qc_old = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert json.loads((again / "config.json").read_text())["quantization_config"] == qc_old
    by_baq, _ = baq.load(again)
    by_hf = AutoModelForCausalLM.from_pretrained(again)
    assert torch.equal(logits(by_baq), expected) and torch.equal(logits(by_hf), expected)
    by_hf.save_pretrained(again)  # a previous baq save is replaced
    assert torch.equal(logits(baq.load(again)[0]), expected)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not a baq model folder"):
        model.save_pretrained(other)
    assert (other / "notes.txt").read_text() == "mine"


def test_pipeline_generates_what_baq_load_generates(folder):
    pipe = transformers.pipeline("text-generation", model=str(folder))
    assert isinstance(pipe.model.model.layers[0].mlp.down_proj, PackedLinear)
    prompt = "the value of the"
    got = pipe(prompt, max_new_tokens=5, do_sample=False, return_tensors=True)
    model, tok = baq.load(folder)
    x = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=5, do_sample=False)
    assert list(got[0]["generated_token_ids"]) == out[0].tolist()
    assert len(out[0]) == x["input_ids"].shape[1] + 5


def test_generate_uses_the_kv_cache(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.use_cache
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    x = ids(1, 6)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        hook.remove()
        plain = model.generate(x, max_new_tokens=4, do_sample=False, use_cache=False)
    # the prompt once, then one new token per step: the cache holds the rest
    assert lengths == [6, 1, 1, 1]
    assert out.past_key_values.get_seq_length() == 6 + 4 - 1
    assert torch.equal(out.sequences, plain)


def test_without_baq_imported_loading_fails_loudly(folder):
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        "print('LOADED', 'baq' in sys.modules)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode != 0 and "LOADED" not in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert "pip install baq" in last and "import baq" in last, last


def test_import_baq_registers_without_importing_transformers():
    code = (
        "import sys, baq\n"
        "assert 'transformers' not in sys.modules, 'import baq imported transformers'\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m\n"
        "from baq.integrations.transformers_quantizer import BaqHfQuantizer\n"
        "assert m['baq'] is BaqHfQuantizer\n"
        "print('OK')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "OK", run.stderr[-2000:]


def _hf_error(folder, match) -> str:
    with pytest.raises(StorageError, match=match) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_from_pretrained_runs_the_integrity_checks(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "quantized.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "quantized.safetensors").write_bytes(bytes(data))
    assert "quantized.safetensors" in _hf_error(bad, "SHA-256")

    shutil.copy(folder / "quantized.safetensors", bad / "quantized.safetensors")
    dense = load_file(bad / "model.safetensors")
    dense.pop("model.norm.weight")
    save_file(dense, bad / "model.safetensors", metadata={"format": "pt"})
    rehash_manifest(bad, "model.safetensors")
    assert "model.safetensors" in _hf_error(bad, "model.norm.weight is missing")

    (bad / "manifest.json").unlink()
    _hf_error(bad, "manifest.json")


def test_model_card(tmp_path):
    model = make_tiny_llama()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    cfg = QuantConfig(allocation="layer", method="baq", bits=3)
    results = quantize_all(model, cfg)
    summary = {"perplexity_after": {"wikitext2": 25.86}, "divergence": {}}
    out = storage.save_quantized(tmp_path / "q", model, None, results, cfg, summary)
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M\n" in front
    assert "base_model_relation: quantized\n" in front
    assert "| perplexity, wikitext2 | 25.86 |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "import baq" in card
    assert "README.md" in json.loads((out / "manifest.json").read_text())["files"]
    # a re-save through transformers keeps the card's facts (they live in quantization_config)
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(tmp_path / "again")
    assert "base_model: HuggingFaceTB/SmolLM2-135M\n" in (tmp_path / "again/README.md").read_text()
    # a local folder is no hub repo: no base_model line
    model.config._name_or_path = str(tmp_path)
    local = storage.save_quantized(tmp_path / "local", model, None, results, cfg)
    assert "base_model" not in (local / "README.md").read_text()


def test_model_card_says_which_grid_allocation_and_head():
    from baq.saved.model_card import model_card

    base = {"method": "baq", "bits": 3, "group_size": None}
    oc = model_card({**base, "config": {"dim": "oc", "allocation": "layer"}})
    assert "| grid | per output row, no groups |" in oc
    assert "| bit allocation | per layer |" in oc and "| output head | float |" in oc
    model_level = {"dim": "ic", "allocation": "model", "importance": "noise", "include_head": 1}
    ic = model_card({**base, "group_size": 128, "config": model_level})
    assert "| grid | per input column, groups of 128 |" in ic
    assert "whole model (noise importances)" in ic and "| output head | quantized |" in ic
    assert "| bit allocation | uniform |" in model_card({**base, "method": "gptq"})

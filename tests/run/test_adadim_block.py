"""AdaDim's block output criterion (baq.run.adadim_block): the errors against a slow reference, the
choice on blocks built to favour each grid, and --adadim block through measure and quantize."""

import copy
import json

import pytest
import torch
from torch import nn

from baq.cli import main
from baq.config import QuantConfig
from baq.quant import adadim
from baq.quant import grid as G
from baq.run import adadim_block
from helpers import corpus


class MLPBlock(nn.Module):
    """A residual two-linear block, ``x + down(gelu(up(x)))``: enough for the rest of the block
    to change what a linear's error costs, and called like a decoder block."""

    def __init__(self, hidden=48, inner=64):
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x, **kwargs):
        return (x + self.down(nn.functional.gelu(self.up(x))),)  # a tuple, as older blocks


def outlier_channel_block(n=16, seq=32, hidden=48):
    """Inputs with three outlier channels (x50) on correspondingly small weights of ``up``."""
    block = MLPBlock(hidden)
    scale = torch.ones(hidden)
    scale[[3, 17, 30]] = 50.0
    with torch.no_grad():
        block.up.weight /= scale.sqrt()
    return block, torch.randn(n, seq, hidden) * scale


def outlier_row_block(n=16, seq=32, hidden=48):
    """Well-behaved inputs; two rows of ``up`` 20 times the others."""
    block = MLPBlock(hidden)
    with torch.no_grad():
        block.up.weight[[5, 40]] *= 20
    return block, torch.randn(n, seq, hidden)


def slow_block_errors(block, windows, cfg):
    """Each linear alone swapped for its RTN copy in a fresh copy of the block, in each dim."""
    ref = block(windows)[0]
    out = {}
    for name in ("up", "down"):
        out[name] = {}
        for dim in ("oc", "ic"):
            swapped = copy.deepcopy(block)
            lin = getattr(swapped, name)
            W = lin.weight.detach().clone()
            L = G.uniform_levels(W.shape[1], int(cfg.bits))
            with torch.no_grad():
                lin.weight.copy_(adadim.rtn_weights(W, L, dim, cfg.group_size, cfg.sym))
                out[name][dim] = float((swapped(windows)[0] - ref).pow(2).sum())
    return out


@pytest.mark.parametrize("group_size", [None, 16])
def test_block_errors_equal_a_slow_reference_and_leave_the_weights(group_size):
    block, x = outlier_channel_block()
    targets = {"up": block.up, "down": block.down}
    before = {k: v.clone() for k, v in block.state_dict().items()}
    cfg = QuantConfig(method="gptq", bits=3, dim="auto", adadim="block", group_size=group_size)
    windows = x[: adadim_block.BLOCK_WINDOWS]
    got = adadim_block.block_output_errors(block, targets, windows, {}, cfg)
    want = slow_block_errors(block, windows, cfg)
    for name in targets:
        for dim in ("oc", "ic"):
            assert got[name][dim] == pytest.approx(want[name][dim], rel=1e-4)
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


@pytest.mark.parametrize(
    "make,want", [(outlier_channel_block, "ic"), (outlier_row_block, "oc")], ids=["in", "rows"]
)
def test_block_criterion_isolates_the_outliers(make, want):
    block, x = make()
    targets = {"up": block.up, "down": block.down}
    cfg = QuantConfig(allocation="layer", method="baq", bits=3, dim="auto", adadim="block")
    errors = adadim_block.block_output_errors(block, targets, x[:8], {}, cfg)
    other = "ic" if want == "oc" else "oc"
    assert errors["up"][want] < 0.8 * errors["up"][other]  # not a near tie
    dims = adadim_block.choose_dims(block, targets, x, {}, torch.device("cpu"), cfg)
    assert dims["up"] == want
    assert dims["down"] == ("ic" if errors["down"]["ic"] < errors["down"]["oc"] else "oc")


def test_choose_dims_reads_only_the_first_windows(monkeypatch):
    block, x = outlier_channel_block(n=20)
    seen = []
    real = adadim_block.block_output_errors

    def spy(block, targets, windows, *a, **k):
        seen.append(windows.clone())
        return real(block, targets, windows, *a, **k)

    monkeypatch.setattr(adadim_block, "block_output_errors", spy)
    cfg = QuantConfig(allocation="layer", method="baq", bits=3, dim="auto", adadim="block")
    adadim_block.choose_dims(block, {"up": block.up}, x, {}, torch.device("cpu"), cfg)
    assert torch.equal(seen[0], x[: adadim_block.BLOCK_WINDOWS])


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus(120_000))
    return path


CALIB = ["--nsamples", "8", "--seqlen", "64"]
EVAL = ["--eval-windows", "1", "--eval-seqlen", "64"]


def test_adadim_block_without_dim_auto_exits_2_before_loading(
    tiny_model_dir, no_model_load, capsys
):
    for cmd in (["quantize", "--bits", "3"], ["measure", "--output", "m.safetensors"]):
        assert main([cmd[0], str(tiny_model_dir), *cmd[1:], "--adadim", "block"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("baq: error: ") and "\n" not in err and "--dim auto" in err


def test_quantize_uses_the_block_choice(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """The pipeline solves each linear on the grid the block criterion chose: forced to IC for
    every linear here (the real choice on the tiny model need not differ from the proxy's)."""
    calls = []

    def all_ic(block, targets, inputs, kwargs, device, cfg, levels=None):
        calls.append((sorted(targets), len(inputs)))
        return {name: "ic" for name in targets}

    monkeypatch.setattr(adadim_block, "choose_dims", all_ic)
    out, report = tmp_path / "q", tmp_path / "report.json"
    argv = ["quantize", str(tiny_model_dir), "--method", "baq", "--bits", "3", "--dim", "auto"]
    argv += ["--adadim", "block", "--allocation", "layer", "--calib", str(text_file), *CALIB, *EVAL]
    assert main([*argv, "--output", str(out), "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    assert len(calls) == 2 and all(n == 8 for _, n in calls)  # once per block, its inputs
    assert {r["dim"] for r in rep["layers"]} == {"ic"} and len(rep["layers"]) == 14


def test_measure_with_adadim_block_serves_only_its_own_settings(
    tiny_model_dir, text_file, tmp_path, capsys
):
    meas = tmp_path / "m.safetensors"
    common = ["--calib", str(text_file), *CALIB, "--dim", "auto"]
    assert main(["measure", str(tiny_model_dir), *common, "--adadim", "block", "-q",
                 "--output", str(meas)]) == 0  # fmt: skip
    argv = ["quantize", str(tiny_model_dir), "--bits", "3", *common, "--measurement", str(meas)]
    argv += EVAL
    out = tmp_path / "q"
    assert main([*argv, "--adadim", "block", "--output", str(out), "-q"]) == 0
    assert (out / "config.json").exists()
    capsys.readouterr()
    assert main([*argv, "--output", str(tmp_path / "q2"), "-q"]) == 2  # proxy: another setting
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--adadim" in err
    assert not (tmp_path / "q2").exists()

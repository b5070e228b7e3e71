"""The model-level allocation end to end on a tiny model: baq measure, baq plan, baq quantize."""

from __future__ import annotations

import json

import pytest
import torch

from baq.cli import main
from baq.config import QuantConfig
from baq.run import allocation, measure
from helpers import corpus, make_tiny_llama


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus(200_000))
    return path


CALIB = ["--nsamples", "8", "--seqlen", "64", "--seed", "1"]


def test_measurement_round_trip_and_plan_meets_the_budget(tmp_path):
    model = make_tiny_llama()
    calib = torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=2.5, allocation="model", sensitivity="analytic", clip=False)
    meas = measure.measure_model(model, calib, cfg, ("fisher",), "cpu", "digest")
    assert len(meas.names) == 14 and all(
        meas.sens[n].shape == (s[1],) for n, s in zip(meas.names, meas.shapes)
    )
    assert all(b > 0 for b in meas.beta["fisher"].values())
    meas.save(tmp_path / "m.safetensors")
    back = measure.Measurement.load(tmp_path / "m.safetensors")
    assert back.names == meas.names and back.beta == meas.beta and back.settings == meas.settings
    assert all(torch.equal(back.sens[n], meas.sens[n]) for n in meas.names)
    plans = allocation.plan_levels(back, cfg)
    assert 2.5 - 0.01 < allocation.plan_bits(plans) <= 2.5 + 1e-9
    # a layer made 100x more important gains bits, the others give them up
    louder = measure.Measurement.load(tmp_path / "m.safetensors")
    target = meas.names[3]
    louder.beta["fisher"][target] *= 100
    again = {p.name: p for p in allocation.plan_levels(louder, cfg)}
    assert again[target].bits > {p.name: p for p in plans}[target].bits
    with pytest.raises(ValueError, match="calibration windows"):
        meas.check(measure.settings_of("digest", calib[:3], cfg))
    with pytest.raises(ValueError, match="model weights"):
        meas.check(measure.settings_of("other", calib, cfg))
    with pytest.raises(ValueError, match="percdamp"):
        meas.check(
            measure.settings_of(
                "digest",
                calib,
                QuantConfig(percdamp=0.1, allocation="model", sensitivity="analytic", clip=False),
            )
        )
    meas.check(
        measure.settings_of(
            "digest",
            calib,
            QuantConfig(bits=4, allocation="model", sensitivity="analytic", clip=False),
        )
    )


@pytest.mark.parametrize("extra", [{"clip": True}, {"dim": "auto"}])
def test_clipped_and_adadim_measurements_serve_their_own_budget_only(extra):
    model = make_tiny_llama()
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    at = lambda bits, **kw: QuantConfig(  # noqa: E731
        bits=bits, allocation="model", sensitivity="analytic", **{"clip": False, **kw}
    )
    meas = measure.measure_model(model, calib, at(3, **extra), (), "cpu", "d")
    meas.check(measure.settings_of("d", calib, at(3, **extra)))
    with pytest.raises(ValueError, match="bits"):  # its grids were fitted at 8 levels
        meas.check(measure.settings_of("d", calib, at(4, **extra)))
    with pytest.raises(ValueError):  # nor does it serve a run without the setting
        meas.check(measure.settings_of("d", calib, at(3)))
    if "clip" in extra:  # the clipped ranges are narrower, so every sensitivity is smaller
        plain = measure.measure_model(model, calib, at(3), (), "cpu", "d")
        assert all((meas.sens[n] <= plain.sens[n] * (1 + 1e-6)).all() for n in meas.names)
        assert any((meas.sens[n] < plain.sens[n] * 0.999).any() for n in meas.names)


def test_hessians_read_the_first_measure_samples_windows():
    model = make_tiny_llama()
    calib = torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, allocation="model", sensitivity="analytic", measure_samples=2)
    every = QuantConfig(bits=3, allocation="model", sensitivity="analytic", measure_samples=None)
    few = measure.measure_model(model, calib, cfg, (), "cpu", "d")
    same = measure.measure_model(model, calib[:2], every, (), "cpu", "d")
    full = measure.measure_model(model, calib, every, (), "cpu", "d")
    assert all(torch.equal(few.sens[n], same.sens[n]) for n in few.names)
    assert any(not torch.equal(few.sens[n], full.sens[n]) for n in few.names)
    # a measurement of every window (and files from before the field) serves no default run
    with pytest.raises(ValueError, match="--measure-samples"):
        full.check(measure.settings_of("d", calib, cfg))
    few.check(measure.settings_of("d", calib, cfg))


def test_measure_plan_quantize_on_a_tiny_model(tiny_model_dir, text_file, tmp_path, capsys):
    meas = tmp_path / "m.safetensors"
    # unclipped ranges: one measurement serves every budget (clipped ones are fitted at one)
    argv = ["measure", str(tiny_model_dir), "--calib", str(text_file), *CALIB, "--no-clip"]
    assert main([*argv, "--importance", "fisher", "noise", "--output", str(meas), "-q"]) == 0
    # --lazy reads one block at a time and measures the same
    lazy = tmp_path / "lazy.safetensors"
    assert main([*argv, "--lazy", "--output", str(lazy), "-q"]) == 0
    full, streamed = measure.Measurement.load(meas), measure.Measurement.load(lazy)
    assert streamed.settings == full.settings and streamed.names == full.names
    assert all(torch.equal(streamed.sens[n], full.sens[n]) for n in full.names)
    assert streamed.beta["fisher"] == pytest.approx(full.beta["fisher"], rel=1e-5)
    assert main([*argv, "--lazy", "--importance", "noise", "--output", str(lazy)]) == 2
    assert "needs the whole model" in capsys.readouterr().err
    assert main(["plan", "--measurement", str(meas), "--bits", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "14 layers: 2.4" in out or "14 layers: 2.5000" in out
    assert "at 4 bits: modelled loss" in out
    # with the measurement, and without it (measured inside the run): the same quantized model
    q = ["quantize", str(tiny_model_dir), "--allocation", "model", "--bits", "2.5", "--no-clip"]
    q += ["--calib", str(text_file), *CALIB, "--eval", "none"]
    reports = []
    for extra in (["--measurement", str(meas)], ["--importance", "fisher"]):
        rep = tmp_path / f"r{len(reports)}.json"
        assert main([*q, *extra, "--report", str(rep), "-q"]) == 0
        reports.append(json.loads(rep.read_text()))
    a, b = reports
    assert a["quant"]["allocation"] == "model" and a["quant"]["sensitivity"] == "analytic"
    assert [r["level_histogram"] for r in a["layers"]] == [
        r["level_histogram"] for r in b["layers"]
    ]
    assert "measure" in b["seconds"] and "measure" not in a["seconds"]
    assert 2.49 < a["nominal_bits"] <= 2.5 + 1e-9
    assert all(r["beta"] > 0 and r["modelled_loss"] > 0 for r in a["layers"])
    # the noise estimator's plan differs from the Fisher one's only through beta
    rep = tmp_path / "noise.json"
    assert (
        main([*q, "--measurement", str(meas), "--importance", "noise", "--report", str(rep), "-q"])
        == 0
    )
    betas = [r["beta"] for r in json.loads(rep.read_text())["layers"]]
    assert betas != [r["beta"] for r in a["layers"]]


def test_model_allocation_refusals(tiny_model_dir, text_file, tmp_path, capsys):
    meas = tmp_path / "m.safetensors"
    argv = ["measure", str(tiny_model_dir), "--calib", str(text_file), *CALIB]
    assert main([*argv, "--output", str(meas), "-q"]) == 0
    q = ["quantize", str(tiny_model_dir), "--calib", str(text_file), "--eval", "none"]
    bad = [
        # another calibration set than the measurement's: refused after loading, one line
        (
            [
                *q,
                "--nsamples",
                "4",
                "--seqlen",
                "64",
                "--allocation",
                "model",
                "--measurement",
                str(meas),
            ],
            "calibration windows",
        ),
        (
            [*q, *CALIB, "--allocation", "model", "--measurement", str(meas), "--percdamp", "0.05"],
            "percdamp",
        ),
        ([*q, *CALIB, "--allocation", "layer", "--measurement", str(meas)], "--allocation model"),
        ([*q, *CALIB, "--method", "gptq", "--measurement", str(meas)], "--allocation model"),
        (
            [
                *q,
                *CALIB,
                "--allocation",
                "model",
                "--measurement",
                str(meas),
                "--importance",
                "noise",
            ],
            "no noise importances",
        ),
        (
            [*q, *CALIB, "--allocation", "model", "--measurement", str(tmp_path / "x")],
            "no such file",
        ),
        ([*q, *CALIB, "--allocation", "model", "--method", "gptq"], "baq only"),
        (["plan", "--measurement", str(meas), "--bits", "9"], "--bits=9.0"),
        (["plan", "--measurement", str(meas), "--bits", "8", "--max-levels", "16"], "max-levels"),
        (["plan", "--measurement", str(text_file)], "not a readable measurement"),
    ]
    for args, message in bad:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("baq: error:") and "\n" not in err and message in err, err


def test_resumed_model_allocation_uses_the_same_plan(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    from baq.run import checkpoint

    out = tmp_path / "out"
    q = ["quantize", str(tiny_model_dir), "--allocation", "model", "--bits", "2.5", "--no-clip"]
    q += ["--calib", str(text_file), *CALIB, "--eval", "none", "--skip-before", "-q"]
    assert main([*q, "--output", str(tmp_path / "whole")]) == 0
    real = checkpoint.Checkpoint.save_block

    def interrupt(self, index, *a):
        real(self, index, *a)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoint, "save_block", interrupt)
    assert main([*q, "--output", str(out)]) == 130
    assert (checkpoint.partial_dir(out) / "measurement.safetensors").is_file()
    monkeypatch.setattr(checkpoint.Checkpoint, "save_block", real)
    calls = []
    monkeypatch.setattr(measure, "measure_model", lambda *a, **k: calls.append(1))
    assert main([*q, "--output", str(out), "--resume"]) == 0
    assert not calls  # the plan came from the checkpoint's measurement
    for name in ("quantized.safetensors", "model.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()

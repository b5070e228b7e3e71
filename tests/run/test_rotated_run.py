"""``--rotate`` through the run (issue 27 item 2): the measurement in the rotated basis and its
key, the model-level plan applied to rotated layers, a lazy run and a resumed run giving the
bytes of a whole uninterrupted one, the bench's ``-rot`` runs and their keys, the flags."""

import json
from pathlib import Path

import pytest
import torch

from baq.bench import grid as bench_grid
from baq.cli import main
from baq.config import QuantConfig
from baq.run import checkpoint, measure
from helpers import corpus, folder_bytes, make_tiny_llama, make_tokenizer

MODEL = dict(bits=3, allocation="model", sensitivity="analytic", clip=False)  # any budget


def test_the_measurement_key_follows_rotate():
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    plain = measure.config_settings(QuantConfig(**MODEL, rotate=False))
    rotated = measure.config_settings(QuantConfig(**MODEL, rotate=True))
    assert "rotate" not in plain and "rotate_seed" not in plain  # files from before still serve
    assert rotated["rotate"] is True
    assert rotated != plain
    # the seed enters with rotate only (without it no layer's seed is used)
    unrotated = QuantConfig(**MODEL, rotate=False, rotate_seed=5)
    assert "rotate_seed" not in measure.config_settings(unrotated)
    seeded = measure.config_settings(QuantConfig(**MODEL, rotate=True, rotate_seed=5))
    assert seeded["rotate_seed"] == 5

    model = make_tiny_llama()
    meas = measure.measure_model(model, calib, QuantConfig(**MODEL, rotate=True), (), "cpu", "d")
    meas.check(measure.settings_of("d", calib, QuantConfig(**MODEL, rotate=True)))
    meas.check(measure.settings_of("d", calib, QuantConfig(**{**MODEL, "bits": 4}, rotate=True)))
    with pytest.raises(ValueError, match="--rotate"):
        meas.check(measure.settings_of("d", calib, QuantConfig(**MODEL, rotate=False)))
    with pytest.raises(ValueError, match="rotate_seed"):
        meas.check(
            measure.settings_of("d", calib, QuantConfig(**MODEL, rotate=True, rotate_seed=1))
        )
    # the sensitivities are the rotated layers': other numbers than the plain measurement's
    plain_cfg = QuantConfig(**MODEL, rotate=False)
    plain_meas = measure.measure_model(model, calib, plain_cfg, (), "cpu", "d")
    assert meas.names == plain_meas.names and meas.shapes == plain_meas.shapes
    assert all(not torch.allclose(meas.sens[n], plain_meas.sens[n]) for n in meas.names)
    # and the float model is untouched by measuring it
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.weight,
        make_tiny_llama().model.layers[0].self_attn.q_proj.weight,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-block tiny Llama with a tied head, in safetensors shards (for --lazy), and a text."""
    root = tmp_path_factory.mktemp("rotated-run")
    model_dir = root / "tiny4"
    make_tiny_llama(layers=4).save_pretrained(model_dir, max_shard_size="200KB")
    make_tokenizer().save_pretrained(model_dir)
    text = root / "corpus.txt"
    text.write_text(corpus(100_000))
    return root, model_dir, text


def argv(setup, out: Path, *extra: str) -> list[str]:
    root, model_dir, text = setup
    return [
        "quantize", str(model_dir), "-q", "--bits", "2.5", "--rotate", "--include-head",
        "--calib", str(text), "--nsamples", "6", "--seqlen", "32", "--eval", str(text),
        "--eval-windows", "2", "--eval-seqlen", "32", "--skip-before", "--device", "cpu",
        "--output", str(out), "--report", str(out.with_suffix(".json")), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def whole(setup):
    out = setup[0] / "whole"
    assert main(argv(setup, out)) == 0
    return out


def report(out: Path) -> dict:
    return json.loads(out.with_suffix(".json").read_text())


def test_model_allocation_with_rotation_saves_rotated_layers(whole):
    from safetensors.torch import load_file

    rep = report(whole)
    assert rep["quant"]["rotate"] is True and rep["quant"]["allocation"] == "model"
    tensors = load_file(whole / "quantized.safetensors")
    layers = {k.removesuffix(".level_classes") for k in tensors if k.endswith(".level_classes")}
    assert len(layers) == 4 * 7 + 1  # every decoder linear and the head
    assert all(f"{name}.rotation" in tensors for name in layers)


def test_rotation_is_the_default_and_no_rotate_turns_it_off(setup, whole, tmp_path):
    """Without the flag the run is the ``--rotate`` run, byte for byte; ``--no-rotate`` saves
    no layer's seed (codes in the original basis) and quantizes other codes."""
    from safetensors.torch import load_file

    default = tmp_path / "default"
    assert main([a for a in argv(setup, default) if a != "--rotate"]) == 0
    assert folder_bytes(default) == folder_bytes(whole)
    plain = tmp_path / "plain"
    assert main([*(a for a in argv(setup, plain) if a != "--rotate"), "--no-rotate"]) == 0
    tensors = load_file(plain / "quantized.safetensors")
    assert not any(k.endswith(".rotation") for k in tensors)
    assert report(plain)["quant"]["rotate"] is False
    assert report(plain)["quant"]["min_levels"] == 1  # the unrotated floor: columns prunable


def test_the_default_rotation_follows_the_method_and_the_adadim_criterion():
    assert QuantConfig().rotate is True and QuantConfig(method="gptq").rotate is True
    assert QuantConfig().min_levels == 2  # the rotated floor (DESIGN.md section 1)
    assert QuantConfig(method="rtn").rotate is False  # the plain baseline
    block = QuantConfig(dim="auto", adadim="block")
    assert block.rotate is False and block.min_levels == 1
    assert QuantConfig(dim="auto").rotate is True
    with pytest.raises(ValueError, match="--no-rotate"):
        QuantConfig(dim="auto", adadim="block", rotate=True)


def test_lazy_rotated_run_gives_the_bytes_and_perplexity_of_a_whole_load(setup, whole, tmp_path):
    out = tmp_path / "lazy"
    assert main(argv(setup, out, "--lazy")) == 0
    assert folder_bytes(out) == folder_bytes(whole)
    # the streamed evaluation rebuilt every weight in the original basis
    assert report(out)["perplexity"] == report(whole)["perplexity"]


def test_interrupted_rotated_run_resumes_to_the_same_bytes(setup, whole, monkeypatch, tmp_path):
    save = checkpoint.Checkpoint.save_block

    def save_then_stop(self, index, results, records):
        save(self, index, results, records)
        if index == 1:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(checkpoint.Checkpoint, "save_block", save_then_stop)
    assert main(argv(setup, out)) == 130
    monkeypatch.setattr(checkpoint.Checkpoint, "save_block", save)
    assert main(argv(setup, out, "--resume")) == 0
    assert folder_bytes(out) == folder_bytes(whole)
    assert report(out)["perplexity"] == report(whole)["perplexity"]


def test_measure_rotate_writes_a_rotated_measurement(setup, tmp_path):
    root, model_dir, text = setup
    out = tmp_path / "m.safetensors"
    args = ["measure", str(model_dir), "-q", "--output", str(out), "--rotate", "--calib", str(text),
            "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert measure.Measurement.load(out).settings["rotate"] is True


def test_bad_rotation_flags_exit_2_before_loading(setup, tmp_path, capsys):
    bad = argv(setup, tmp_path / "x", "--dim", "auto", "--adadim", "block")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert "--adadim proxy with --rotate" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_rotate_seed_draws_every_layers_transform(setup, whole, tmp_path):
    """``--rotate-seed N``: each layer's saved seed is ``layer_seed(N, name)`` (the default is
    0), the report says N, and the codes differ from seed 0's."""
    from safetensors.torch import load_file

    from baq.quant.rotation import layer_seed

    out = tmp_path / "seeded"
    assert main(argv(setup, out, "--rotate-seed", "7")) == 0
    assert report(out)["quant"]["rotate_seed"] == 7 and report(whole)["quant"]["rotate_seed"] == 0
    seeded, plain = (
        load_file(out / "quantized.safetensors"),
        load_file(whole / "quantized.safetensors"),
    )
    names = {k.removesuffix(".rotation") for k in seeded if k.endswith(".rotation")}
    assert len(names) == 4 * 7 + 1
    for name in names:
        assert int(seeded[f"{name}.rotation"]) == layer_seed(7, name)
        assert int(plain[f"{name}.rotation"]) == layer_seed(0, name)
    assert (
        folder_bytes(out)["quantized.safetensors"] != folder_bytes(whole)["quantized.safetensors"]
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--rotate-seed", "-1"],
            "argument --rotate-seed: '-1': use an integer from 0 to 2^63 - 1",
        ),
        (["--rotate-seed", "x"], "argument --rotate-seed: 'x': use an integer from 0 to 2^63 - 1"),
    ],
)
def test_a_bad_rotate_seed_is_one_line(setup, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv(setup, tmp_path / "x", *extra))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_rotate_seed_with_no_rotate_is_refused_before_loading(setup, tmp_path, capsys):
    args = [a for a in argv(setup, tmp_path / "x", "--rotate-seed", "3") if a != "--rotate"]
    assert main([*args, "--no-rotate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "baq: error: --rotate-seed 3 has no effect with --no-rotate: drop one of them"
    assert not (tmp_path / "x").exists()


def test_bench_rotated_runs_are_named_and_keyed_apart(tmp_path):
    settings = bench_grid.BenchSettings(model="m", text="builtin")
    plain = bench_grid.build_grid(["gptq", "baq-model"], [3], [], clip=True)
    both = bench_grid.build_grid(["gptq", "baq-model"], [3], [], clip=True, rotate=True)
    assert [s.name for s in both] == [
        "gptq-3b",
        "gptq-clip-3b",
        "gptq-rot-3b",
        "gptq-rot-clip-3b",
        "baq-model-3b",
        "baq-model-clip-3b",
        "baq-model-rot-3b",
        "baq-model-rot-clip-3b",
    ]
    assert all(s.cfg.rotate == ("-rot" in s.name) for s in both)
    keys = {e.spec.name: e for e in bench_grid.cache_entries(settings, both, tmp_path)}
    # runs without rotation keep the keys they had before the field existed
    for e in bench_grid.cache_entries(settings, plain, tmp_path):
        assert keys[e.spec.name].key == e.key and "rotate" not in e.settings["quant"]
    assert len({e.key for e in keys.values()}) == 8
    assert keys["gptq-rot-3b"].settings["quant"]["rotate"] is True
    # AdaDim's block criterion rounds unrotated weights: no rotated variant of it
    auto = bench_grid.build_grid(["gptq"], [3], [], dims=("auto",), adadim="block", rotate=True)
    assert [s.name for s in auto] == ["gptq-auto-block-3b"]

"""One run composed once (baq.run.session): the library, the command line and the bench agree."""

from __future__ import annotations

import logging

import pytest
import torch

import baq
from baq.cli import main
from baq.config import QuantConfig
from baq.run import walker
from baq.run.quantization import quantize_model
from helpers import corpus, folder_bytes, make_tiny_llama


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("session") / "corpus.txt"
    path.write_text(corpus(60_000))
    return path


def test_library_defaults_give_the_command_lines_saved_bytes(tiny_model_dir, text, tmp_path):
    """``baq.quantize`` with its defaults is ``baq quantize`` with its defaults: BAQ at 3 bits with
    one budget for the whole model, measured first; the saved folders are identical."""
    cli_out, lib_out = tmp_path / "cli" / "m", tmp_path / "lib" / "m"
    cli_out.parent.mkdir(), lib_out.parent.mkdir()
    argv = ["quantize", str(tiny_model_dir), "-q", "--device", "cpu", "--eval", "none"]
    argv += ["--calib", str(text), "--nsamples", "8", "--seqlen", "32", "--output", str(cli_out)]
    assert main(argv) == 0
    model, tok = baq.load_model(str(tiny_model_dir))
    result = baq.quantize(
        model, tok, calibration=str(text), nsamples=8, seqlen=32, device="cpu", output=lib_out
    )
    quant = result.report["quant"]
    assert quant["allocation"] == "model" and quant["sensitivity"] == "analytic"
    assert all(r.beta is not None and r.beta > 0 for r in result.records)  # priced by the plan
    assert "measure" in result.report["seconds"]
    assert folder_bytes(cli_out) == folder_bytes(lib_out)  # every file, byte for byte


def test_library_shards_a_save_as_the_command_line_does(tiny_model_dir, text, tmp_path):
    """``baq.quantize(max_shard_size=...)`` is ``baq quantize --max-shard-size``: the same
    shards, byte for byte; a size that is not one is refused before the model is touched."""
    cli_out, lib_out = tmp_path / "cli" / "m", tmp_path / "lib" / "m"
    cli_out.parent.mkdir(), lib_out.parent.mkdir()
    argv = ["quantize", str(tiny_model_dir), "-q", "--device", "cpu", "--eval", "none"]
    argv += ["--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--method", "gptq"]
    assert main([*argv, "--max-shard-size", "40KB", "--output", str(cli_out)]) == 0
    model, tok = baq.load_model(str(tiny_model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig(method="gptq", bits=3.0)  # as the command line parses it
    with pytest.raises(ValueError, match="max shard size '5 apples'"):
        baq.quantize(model, tok, cfg, str(text), 4, 32, device="cpu", max_shard_size="5 apples")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    baq.quantize(
        model, tok, cfg, str(text), 4, 32, device="cpu", output=lib_out, max_shard_size="40KB"
    )
    files = folder_bytes(lib_out)
    assert any(name.endswith(".safetensors.index.json") for name in files)  # sharded
    assert files == folder_bytes(cli_out)
    assert baq.load(lib_out) is not None


def test_a_model_level_config_never_reaches_a_per_layer_run():
    model = make_tiny_llama()
    ids = torch.randint(3, 500, (4, 16))
    with pytest.raises(ValueError, match="allocation plan"):
        quantize_model(model, ids, QuantConfig(method="baq", bits=3), device="cpu")
    # the same config through the library's composer measures, plans, and then quantizes
    result = baq.quantize(model, None, QuantConfig(method="baq", bits=3), ids, device="cpu")
    assert {r.beta is not None for r in result.records} == {True}
    assert result.nominal_bits == pytest.approx(3.0, abs=0.02)


def test_without_a_terminal_the_walk_logs_its_progress(caplog):
    """Outside a terminal (nohup, CI, a notebook's captured output) the bar is off and log lines
    say the stage, the block, the seconds so far and the estimate of what is left."""
    model = make_tiny_llama(layers=4)
    ids = torch.randint(3, 500, (2, 16))
    with caplog.at_level(logging.INFO, logger="baq.progress"):
        quantize_model(model, ids, QuantConfig(method="gptq", bits=4), "cpu", progress=False)
    lines = [r.getMessage() for r in caplog.records if "left" in r.getMessage()]
    assert [line.split(",")[0] for line in lines] == [
        f"gptq 4 bits: block {k} of 4" for k in range(1, 5)
    ]
    assert lines[-1].endswith("about 0 s left")


def test_the_command_line_prints_stages_and_blocks_by_default(tiny_model_dir, text, caplog):
    """At the default verbosity, off a terminal, a run logs each stage and every few blocks."""
    argv = ["quantize", str(tiny_model_dir), "--device", "cpu", "--eval", "none", "--method"]
    argv += ["gptq", "--bits", "4", "--calib", str(text), "--nsamples", "4", "--seqlen", "32"]
    caplog.set_level(logging.NOTSET)  # the command line sets the levels, as it does for a user
    assert main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "baq.progress"]
    assert "stage quantize: gptq at 4 bits" in lines
    assert any(line.startswith("gptq 4 bits: block 2 of 2") for line in lines)


def test_progress_is_a_bar_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert walker.bar_disabled(None) is True and walker.bar_disabled(True) is False
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert walker.bar_disabled(None) is False and walker.bar_disabled(False) is True

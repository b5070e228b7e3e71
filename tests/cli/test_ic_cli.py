"""baq quantize --dim ic / auto end to end on the tiny model."""

import json

import pytest

from baq.cli import main
from baq.saved import manifest
from helpers import corpus


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus(120_000))
    return path


def test_dim_auto_with_rtn_exits_2_before_loading(tiny_model_dir, no_model_load, capsys):
    argv = ["quantize", str(tiny_model_dir), "--method", "rtn", "--bits", "3", "--dim", "auto"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("baq: error: ") and "\n" not in err and "--dim" in err


@pytest.mark.parametrize(
    "extra",
    [["--dim", "ic", "--group-size", "24", "--act-order"], ["--dim", "auto"]],
    ids=["ic-g24-act", "auto"],
)
def test_quantize_dim_saves_loads_and_reports_the_choice(
    extra, tiny_model_dir, text_file, tmp_path
):
    out, report = tmp_path / "q", tmp_path / "report.json"
    argv = ["quantize", str(tiny_model_dir), "--method", "baq", "--bits", "3", *extra]
    argv += ["--calib", str(text_file), "--nsamples", "8", "--seqlen", "64"]
    argv += ["--eval", str(text_file), "--eval-windows", "2", "--eval-seqlen", "64"]
    assert main([*argv, "--output", str(out), "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    dims = {r["name"]: r["dim"] for r in rep["layers"]}
    saved = {r["name"]: r["dim"] for r in manifest.inspect_quantized(out)}
    assert len(saved) == 14 and all(d in ("oc", "ic") for d in saved.values())
    assert sorted(saved.values()) == sorted(dims.values())  # the report says what was stored
    if extra[1] == "ic":
        assert set(saved.values()) == {"ic"}
    assert rep["storage_bits"] == pytest.approx(manifest.storage_bits(out), abs=1e-9)
    ppl_after = rep["perplexity"][str(text_file)]["after"]
    assert (
        main(
            [
                "eval",
                str(out),
                "--eval",
                str(text_file),
                "--eval-windows",
                "2",
                "--eval-seqlen",
                "64",
                "--report",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    got = json.loads((tmp_path / "eval.json").read_text())["sets"][str(text_file)]["perplexity"]
    assert got == pytest.approx(ppl_after, rel=1e-4)  # the saved per-IC layers are the run's

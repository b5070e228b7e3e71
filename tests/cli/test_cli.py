import json
import math

import pytest
import torch

from baq.cli import main
from baq.cli.common import flagify
from helpers import corpus


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus(200_000))
    return path


BAD = [
    (["--bits", "9"], "--bits=9.0: use a value in [1, 8]"),
    (["--bits", "0.5"], "--bits"),
    (["--method", "gptq", "--bits", "2.5"], "integer"),
    (["--nsamples", "0"], "--nsamples=0"),
    (["--seqlen", "1"], "--seqlen=1"),
    (["--group-size", "0"], "--group-size=0"),
    (["--percdamp", "2"], "--percdamp=2.0"),
    (["--integer-bits", "--method", "rtn", "--bits", "3"], "integer_bits"),
    (["--calib", "missing.txt"], "--calib missing.txt: file not found"),
    (["--calib", "weird"], "not a known source"),
    (["--eval", "missing.jsonl"], "--eval missing.jsonl: file not found"),
    (["--seqlen", "100000"], "exceeds the model's 256 positions"),
    (["--eval-seqlen", "4096"], "exceeds the model's 256 positions"),
    (["--bits", "8", "--max-levels", "16"], "raise --max-levels"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_arguments_exit_2_with_one_line_before_loading(
    extra, message, tiny_model_dir, no_model_load, capsys
):
    assert main(["quantize", str(tiny_model_dir), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("baq: error: ") and "\n" not in err
    assert message in err


def test_missing_model_and_output_exists(tmp_path, tiny_model_dir, no_model_load, capsys):
    assert main(["quantize", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path)]) == 2  # a folder that is not a model
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    assert main(["quantize", str(tiny_model_dir), "--output", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err


def test_quantize_end_to_end_writes_a_consistent_report(tiny_model_dir, text_file, tmp_path):
    report = tmp_path / "run" / "report.json"
    argv = ["quantize", str(tiny_model_dir), "--method", "baq", "--bits", "2.5"]
    argv += ["--calib", str(text_file), "--nsamples", "8", "--seqlen", "64", "--seed", "3"]
    argv += ["--eval", str(text_file), "--eval-windows", "3", "--eval-seqlen", "128"]
    assert main([*argv, "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    assert rep["quant"]["method"] == "baq" and rep["quant"]["bits"] == 2.5
    # BAQ's default is one budget for the model, measured first as a stage of its own
    assert rep["quant"]["allocation"] == "model" and rep["quant"]["sensitivity"] == "analytic"
    assert rep["seconds"]["measure"] > 0
    assert rep["quantized_layers"] == 14  # 2 blocks x 7 linears
    layers = rep["layers"]
    assert {tuple(r["shape"]) for r in layers} == {(64, 64), (32, 64), (128, 64), (64, 128)}
    # nominal bits recomputed from the per-layer histograms and shapes
    bits = sum(
        math.log2(int(L)) * n * r["shape"][0]
        for r in layers
        for L, n in r["level_histogram"].items()
    )
    weights = sum(r["shape"][0] * r["shape"][1] for r in layers)
    assert rep["nominal_bits"] == pytest.approx(bits / weights)
    assert 2.45 < rep["nominal_bits"] <= 2.5
    assert rep["quantized_weights"] == weights
    ppl = rep["perplexity"][str(text_file)]
    assert ppl["before"] == pytest.approx(slow_perplexity(tiny_model_dir, text_file, 3, 128), 1e-4)
    # KL against the model before quantizing; equal windows: mean dnll is ln(PPL_q / PPL_base)
    kl = rep["divergence"][str(text_file)]
    assert kl["kl_mean"] > 0 and 0 < kl["kl_top_token_agreement"] <= 1
    ratio = math.log(ppl["after"] / ppl["before"])
    assert kl["kl_mean_ln_ppl_ratio"] == pytest.approx(ratio, rel=1e-4, abs=1e-6)
    for r in layers:
        assert r["beta"] > 0 and r["modelled_loss"] > 0 and r["loss"] >= 0
        assert sum(r["level_histogram"].values()) == r["shape"][1]
    assert rep["seconds"]["quantize"] > 0 and rep["memory"]["peak_rss_gib"] > 0
    # the paper's per-layer allocation: every layer at 2.5 bits, its uniform probe solve reported
    argv[argv.index("--eval") + 1 : argv.index("--eval") + 2] = ["none"]
    assert main([*argv, "--allocation", "layer", "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    assert rep["quant"]["allocation"] == "layer" and "measure" not in rep["seconds"]
    for r in rep["layers"]:
        assert r["uniform_loss"] > 0 and r["loss"] >= 0 and 0 < r["predicted_gain"] <= 1
        hist = r["level_histogram"]
        bits = sum(math.log2(int(L)) * n for L, n in hist.items()) / sum(hist.values())
        assert 2.45 < bits <= 2.5 + 1e-9


def test_eval_prints_perplexity(tiny_model_dir, text_file, capsys):
    assert (
        main(
            [
                "eval",
                str(tiny_model_dir),
                "--eval",
                str(text_file),
                "--eval-windows",
                "2",
                "--eval-seqlen",
                "64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(f"perplexity {text_file}: ")
    printed = float(out.split(": ")[1])
    assert printed == pytest.approx(slow_perplexity(tiny_model_dir, text_file, 2, 64), rel=1e-3)


def slow_perplexity(model_dir, text_file, windows: int, seqlen: int) -> float:
    """exp of the mean next-token loss over the first ``windows`` non-overlapping windows of
    the text, one plain transformers forward each."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tok(text_file.read_text())["input_ids"])
    losses = []
    with torch.no_grad():
        for w in range(windows):
            x = ids[w * seqlen : (w + 1) * seqlen][None]
            logits = model(input_ids=x).logits[0, :-1].float()
            losses.append(F.cross_entropy(logits, x[0, 1:], reduction="none"))
    return math.exp(torch.cat(losses).mean().item())


def test_flag_names_in_config_errors():
    msg = "group_size=0: use a positive integer"
    assert flagify(msg) == "--group-size=0: use a positive integer"
    assert flagify("integer_bits applies to --method baq only").startswith("integer_bits")


def test_calibration_starts_after_the_evaluated_tokens_of_the_same_text(text_file):
    from baq.cli import build_parser
    from baq.cli.calibration import calib_start

    def start(*extra):
        return calib_start(build_parser().parse_args(["quantize", *extra]))

    same = ["--calib", str(text_file), "--eval", str(text_file)]
    assert start(*same, "--eval-windows", "3", "--eval-seqlen", "100") == 300
    assert start(*same) == 16 * 2048  # the quantize default evaluates 16 windows of 2048
    assert start(*same, "--calib-start", "7") == 7  # an explicit start wins
    assert start("--calib", str(text_file), "--eval", "builtin") == 0  # different texts
    assert start("--calib", "wikitext2", "--eval", "wikitext2") == 0  # train vs test split

import json
import math

import pytest

from baq import cli, data
from baq.bench import grid as bench_grid
from baq.bench import runner
from baq.eval import scoring
from baq.run import quantization, session

TINY = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "64"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(data.load_text("builtin"))
    return path


@pytest.fixture
def calls(monkeypatch):
    """Counts of quantizations and perplexity evaluations made by the bench."""
    seen = {"quantize": [], "ppl": 0}

    def quantize(model, calib, cfg, **kw):
        seen["quantize"].append(cfg)
        return quantization.quantize_model(model, calib, cfg, **kw)

    def ppl(*args, **kw):
        if kw.get("record_topk") is None:  # not the float model's KL base records
            seen["ppl"] += 1
        return real_score(*args, **kw)

    real_score = scoring.score
    monkeypatch.setattr(session, "quantize_model", quantize)
    monkeypatch.setattr(runner, "score", ppl)  # the base records
    monkeypatch.setattr(scoring, "score", ppl)  # the runs, through evaluate.score_sets
    return seen


def run(model_dir, text, out, *extra, capsys=None):
    argv = ["bench", str(model_dir), "--text", str(text), "--out", str(out), "--device", "cpu"]
    code = cli.main([*argv, *TINY, *extra])
    assert code == 0
    return "" if capsys is None else capsys.readouterr().out


def keys(settings, grid, tmp_path):
    return {e.spec.name: e.key for e in bench_grid.cache_entries(settings, grid, tmp_path)}


def test_run_keys_are_stable_and_follow_the_settings(text, tmp_path):
    grid = bench_grid.build_grid(["fp", "rtn", "gptq"], bits=[3], baq_bits=[])
    base = bench_grid.BenchSettings(model="m", text=str(text), nsamples=4, seqlen=32)
    first = keys(base, grid, tmp_path)
    assert first == keys(
        bench_grid.BenchSettings(model="m", text=str(text), nsamples=4, seqlen=32),
        bench_grid.build_grid(["fp", "rtn", "gptq"], bits=[3], baq_bits=[]),
        tmp_path,
    )
    assert len(set(first.values())) == 3

    more_samples = keys(
        bench_grid.BenchSettings(model="m", text=str(text), nsamples=8), grid, tmp_path
    )
    # FP and RTN read no calibration data, so their cached results survive a change of it
    assert more_samples["fp"] == first["fp"] and more_samples["rtn-3b"] == first["rtn-3b"]
    assert more_samples["gptq-3b"] != first["gptq-3b"]
    other_eval = keys(
        bench_grid.BenchSettings(model="m", text=str(text), eval_windows=4), grid, tmp_path
    )
    assert all(other_eval[k] != first[k] for k in first)
    other_model = keys(bench_grid.BenchSettings(model="n", text=str(text)), grid, tmp_path)
    assert all(other_model[k] != first[k] for k in first)
    damped = keys(
        base, bench_grid.build_grid(["gptq"], bits=[3], baq_bits=[], percdamp=0.1), tmp_path
    )
    assert damped["gptq-3b"] != first["gptq-3b"]
    exact = bench_grid.build_grid(
        ["fp", "rtn", "gptq"], bits=[3], baq_bits=[], range_dtype="float32"
    )
    exact_keys = keys(base, exact, tmp_path)
    assert exact_keys["fp"] == first["fp"] and exact_keys["rtn-3b"] != first["rtn-3b"]
    # a field added later enters the key only when set, so older caches keep their keys
    quant = {
        e.spec.name: e.settings.get("quant", {})
        for e in bench_grid.cache_entries(base, grid, tmp_path)
    }
    assert "range_dtype" not in quant["gptq-3b"] and "percdamp" in quant["gptq-3b"]


def test_grid_names():
    names = [s.name for s in bench_grid.build_grid()]
    # FP, then every quantized family at 2/3/4 bits, and 2.5 bits for those that take fractions
    want = ["fp"] + [
        f"{family}-{b:g}b"
        for family in bench_grid.FAMILIES
        if family != "fp"
        for b in (2, 3, 4, *((2.5,) if family in bench_grid.FRACTIONAL else ()))
    ]
    assert names == want
    assert {"rtn-2b", "gptq-4b", "baq-measured-2.5b", "baq-analytic-3b", "baq-int-2b"} <= set(names)
    assert {"baq-model-2.5b", "baq-model-int-3b", "baq-model-noise-3b"} <= set(names)
    extra = [
        s.name
        for s in bench_grid.build_grid(["rtn", "gptq"], [3], [], group_size=128, act_order=True)
    ]
    assert extra == [
        "rtn-3b",
        "rtn-g128-3b",
        "gptq-3b",
        "gptq-g128-3b",
        "gptq-act-3b",
        "gptq-g128-act-3b",
    ]
    with pytest.raises(ValueError, match="method 'awq'"):
        bench_grid.build_grid(["awq"])


def test_cache_only_runs_what_is_missing(tiny_model_dir, text, tmp_path, calls, capsys):
    out = tmp_path / "out"
    grid = ["--methods", "fp", "rtn", "--bits", "3", "--baq-bits"]
    printed = run(tiny_model_dir, text, out, *grid, capsys=capsys)
    assert [c.method for c in calls["quantize"]] == ["rtn"] and calls["ppl"] == 2
    assert "estimated" in printed and "fp: ppl corpus" in printed and "rtn-3b: ppl" in printed
    cached = sorted(out.glob("*-*.json"))
    assert [p.name.split("-")[0] for p in cached] == ["fp", "rtn"]

    run(tiny_model_dir, text, out, *grid)  # everything cached: nothing runs
    assert len(calls["quantize"]) == 1 and calls["ppl"] == 2

    rtn = next(p for p in cached if p.name.startswith("rtn"))
    rtn.unlink()
    run(tiny_model_dir, text, out, *grid)
    assert len(calls["quantize"]) == 2 and calls["ppl"] == 3 and rtn.is_file()

    for p in cached:
        p.unlink()
    run(tiny_model_dir, text, out, *grid, "--only", "f*")
    assert len(calls["quantize"]) == 2 and calls["ppl"] == 4
    capsys.readouterr()
    listing = run(tiny_model_dir, text, out, *grid, "--list", capsys=capsys)
    assert "cached" in listing.splitlines()[0] and "missing" in listing.splitlines()[1]

    table = (out / "results.md").read_text()
    assert "| fp |" in table and "| rtn-3b |" in table and "not run" in table
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["fp"] and results["missing"] == ["rtn-3b"]


def test_help_names_every_method_and_fractional_family(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens, inside the names
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    methods = text.split("--methods M [M ...]")[-1].split("--bits")[0]
    assert all(f" {name} " in methods or f" {name}," in methods for name in bench_grid.FAMILIES)
    fractional = text.split("--baq-bits [BAQ_BITS ...]")[-1].split("--group-size")[0]
    assert all(name in fractional for name in bench_grid.FRACTIONAL)


def test_bad_arguments_exit_2(tiny_model_dir, text, tmp_path, capsys):
    base = ["bench", str(tiny_model_dir), "--text", str(text), "--out", str(tmp_path)]
    assert cli.main([*base, "--bits", "9"]) == 2
    assert cli.main([*base, "--nsamples", "0"]) == 2
    assert cli.main([*base, "--only", "nothing-*", "--list"]) == 2
    assert cli.main([*base, "--methods", "awq"]) == 2
    assert "--nsamples=0" in capsys.readouterr().err
    assert cli.main([*base, "--methods", "baq-model", "--adadim", "block"]) == 2  # no --dim auto
    err = capsys.readouterr().err.strip()
    assert err.startswith("baq: error: ") and "\n" not in err and "--dim auto" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_weights_are_restored_between_runs(tiny_model_dir, text, tmp_path, calls):
    # RTN first, then FP in the same process: FP must see the original weights
    run(tiny_model_dir, text, tmp_path / "a", "--methods", "rtn", "fp", "--bits", "2", "--baq-bits")
    run(tiny_model_dir, text, tmp_path / "b", "--methods", "fp")
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in "ab")
    fp = next(r for r in a if r["name"] == "fp")
    assert fp["perplexity"] == b[0]["perplexity"]
    assert next(r for r in a if r["name"] == "rtn-2b")["perplexity"] != fp["perplexity"]


def test_results_table_and_plots(tiny_model_dir, text, tmp_path):
    from matplotlib.image import imread

    second = tmp_path / "second.txt"
    second.write_text(text.read_text()[100_000:200_000])
    out = tmp_path / "out"
    grid = ["--methods", "fp", "gptq", "baq-measured", "--bits", "2", "3", "--eval", str(second)]
    run(tiny_model_dir, text, out, *grid)

    results = json.loads((out / "results.json").read_text())["runs"]
    names = [r["name"] for r in results]
    assert names == [
        "fp",
        "gptq-2b",
        "gptq-3b",
        "baq-measured-2b",
        "baq-measured-3b",
        "baq-measured-2.5b",
    ]
    for r in results:
        assert set(r["perplexity"]) == {"corpus", "second"}
        assert all(math.isfinite(v) for v in r["perplexity"].values())
        assert r["memory"]["peak_rss_gib"] > 0 and r["memory"]["peak_is_run"] in (True, False)
    baq3 = results[4]
    assert baq3["nominal_bits"] == pytest.approx(3.0, abs=0.01)  # integer levels, tiny layers
    assert baq3["storage_bits"] > baq3["nominal_bits"]
    assert len(baq3["layers"]) == 2 * 7 and baq3["layers"][0]["loss_ratio"] is not None
    table = (out / "results.md").read_text()
    assert "ppl second" in table and all(f"| {n} |" in table for n in names)
    assert "peak GiB" in table

    plots = ["perplexity.png", "bits-heatmap.png", "level-histogram.png", "predicted-gain.png"]
    plots.append("adadim.png")
    for name in plots:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1024
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0
        path.unlink()
    run(tiny_model_dir, text, out, *grid, "--plots-only")
    assert all((out / name).stat().st_size > 1024 for name in plots)


def test_dim_choice_plot_shows_each_layers_grid():
    import numpy as np

    from baq.bench import plots

    rng = np.random.default_rng(0)
    modules = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    dims = {(b, m): rng.choice(["oc", "ic"]) for b in range(4) for m in modules}
    layers = [{"name": f"model.layers.{b}.{m}", "dim": d} for (b, m), d in dims.items()]
    layers.append({"name": "lm_head", "dim": "ic"})  # not a block's: left out

    def run(name, dim):
        return {"name": name, "settings": {"quant": {"dim": dim}}, "layers": layers}

    run_auto, run_oc = run("baq-model-auto-3b", "auto"), run("baq-model-3b", "oc")
    blocks, mods, grid = plots.dim_choice_grid(run_auto)
    assert blocks == [0, 1, 2, 3] and mods == modules
    for (b, m), d in dims.items():
        assert grid[b][modules.index(m)] == (1.0 if d == "ic" else 0.0)
    fig = plots.plot_dim_choice([run_oc, run_auto])  # only --dim auto runs get a panel
    (ax,) = fig.axes
    assert np.array_equal(ax.images[0].get_array(), np.array(grid))
    assert f"{sum(d == 'ic' for d in dims.values())} of 12" in ax.get_title()


def test_adding_an_evaluation_set_evaluates_only_it(
    tiny_model_dir, text, tmp_path, calls, capsys, caplog
):
    second = tmp_path / "second.txt"
    second.write_text(text.read_text()[100_000:200_000])
    out = tmp_path / "out"
    grid = ["--methods", "fp", "gptq", "--bits", "3", "--baq-bits"]
    run(tiny_model_dir, text, out, *grid)
    assert calls["ppl"] == 2
    before = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    listing = run(tiny_model_dir, text, out, *grid, "--eval", str(second), "--list", capsys=capsys)
    assert listing.count("not evaluated on second") == 2

    run(tiny_model_dir, text, out, *grid, "--eval", str(second))
    # the same cache files; GPTQ quantized once more to evaluate the new set, and only that set
    assert len(list(out.glob("*-*.json"))) == 2
    assert [c.method for c in calls["quantize"]] == ["gptq", "gptq"] and calls["ppl"] == 4
    after = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    for name in ("fp", "gptq-3b"):
        assert list(after[name]["perplexity"]) == ["corpus", "second"]
        assert after[name]["perplexity"]["corpus"] == before[name]["perplexity"]["corpus"]
        assert after[name]["seconds"]["quantize"] == before[name]["seconds"]["quantize"]
    assert after["gptq-3b"]["perplexity"]["second"] != after["fp"]["perplexity"]["second"]
    # without --eval the table shows the grid's sets only; the cache keeps the other one
    run(tiny_model_dir, text, out, *grid)
    assert calls["ppl"] == 4
    shown = json.loads((out / "results.json").read_text())["runs"]
    assert all(list(r["perplexity"]) == ["corpus"] for r in shown)

    # a cached run that no longer quantizes the same way is evaluated again on every set
    path = next(out.glob("gptq-3b-*.json"))
    cached = json.loads(path.read_text())
    cached["layers"][0]["loss"] *= 2
    cached["perplexity"]["corpus"] = 1.0
    cached["eval_digests"].pop("second")
    path.write_text(json.dumps(cached))
    with caplog.at_level("WARNING", logger="baq.bench.runner"):
        run(tiny_model_dir, text, out, *grid, "--eval", str(second))
    assert "quantized differently" in caplog.text and calls["ppl"] == 6
    fresh = json.loads(path.read_text())
    assert fresh["perplexity"]["corpus"] == before["gptq-3b"]["perplexity"]["corpus"]
    assert fresh["layers"][0]["loss"] == before["gptq-3b"]["layers"][0]["loss"]


def test_table_has_one_summary_per_evaluation_set_with_each_cell_in_place():
    from baq.bench.plots import format_table

    runs = [("fp", "FP", None), ("gptq-2b", "GPTQ", 2), ("gptq-3b", "GPTQ", 3)]
    runs += [("baq-2b", "BAQ", 2), ("baq-3b", "BAQ", 3)]

    def result(a, b, peak_is_run=True):
        return {
            "perplexity": {"wiki": a, "ptb": b},
            "nominal_bits": 2.0,
            "storage_bits": 2.05,
            "seconds": {"quantize": 1.0, "eval": 2.0},
            "memory": {"peak_rss_gib": 1.5, "peak_is_run": peak_is_run},
        }

    results = {"fp": result(10.0, 20.0), "gptq-2b": result(111.0, 222.0, False)}
    results |= {"gptq-3b": result(33.0, 44.0), "baq-2b": result(55.0, 66.0)}
    lines = format_table(runs, results).splitlines()
    wiki, ptb = (
        lines.index("Perplexity on wiki (FP 10.000):"),
        lines.index("Perplexity on ptb (FP 20.000):"),
    )
    assert lines[wiki + 2] == "| method | 2 bits | 3 bits |"
    assert lines[wiki + 4] == "| GPTQ | 111.000 | 33.000 |"
    assert lines[wiki + 5] == "| BAQ | 55.000 |  |"  # baq-3b was not run
    assert lines[ptb + 4] == "| GPTQ | 222.000 | 44.000 |"
    assert lines[ptb + 5] == "| BAQ | 66.000 |  |"
    row = next(line for line in lines if line.startswith("| gptq-2b |"))
    assert row.endswith("| <= 1.50 |")  # a peak counted from process start is an upper bound
    assert next(line for line in lines if line.startswith("| baq-3b |")).count("not run") == 1


def test_grid_dims_add_named_variants_and_keep_per_oc_keys(text, tmp_path):
    base = bench_grid.BenchSettings(model="m", text=str(text))
    oc = bench_grid.build_grid(["rtn", "gptq"], [3], [])
    both = bench_grid.build_grid(["rtn", "gptq"], [3], [], dims=("oc", "ic", "auto"))
    assert [s.name for s in both] == [
        "rtn-3b",
        "rtn-ic-3b",
        "gptq-3b",
        "gptq-ic-3b",
        "gptq-auto-3b",
    ]
    k_oc, k_both = keys(base, oc, tmp_path), keys(base, both, tmp_path)
    # per-OC runs keep the keys they had before the dim field existed
    assert all(k_both[name] == k for name, k in k_oc.items())
    assert len(set(k_both.values())) == 5
    quant = {
        e.spec.name: e.settings.get("quant", {})
        for e in bench_grid.cache_entries(base, both, tmp_path)
    }
    assert "dim" not in quant["gptq-3b"] and quant["gptq-ic-3b"]["dim"] == "ic"


def test_model_allocation_runs_share_one_measurement_and_report_kl(
    tiny_model_dir, text, tmp_path, calls
):
    out = tmp_path / "out"
    grid = ["--methods", "fp", "gptq", "baq-model", "--bits", "2", "3", "--baq-bits"]
    run(tiny_model_dir, text, out, *grid)
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(out.glob("measurement-fisher-*.safetensors"))
    first, second = results["baq-model-2b"], results["baq-model-3b"]
    assert first["measurement"]["cached"] is False and second["measurement"]["cached"] is True
    assert first["measurement"]["file"] == second["measurement"]["file"]
    assert first["seconds"]["measure"] > 0 and all(r["beta"] > 0 for r in first["layers"])
    # KL against the float model for every quantized run, none for FP; more bits, less KL
    assert "kl" not in results["fp"] or not results["fp"]["kl"]
    for name in ("gptq-2b", "gptq-3b", "baq-model-2b", "baq-model-3b"):
        kl = results[name]["kl"]["corpus"]
        assert kl["kl_mean"] > 0 and 0 < kl["kl_top_token_agreement"] <= 1
    assert first["kl"]["corpus"]["kl_mean"] > second["kl"]["corpus"]["kl_mean"]
    table = (out / "results.md").read_text()
    assert "Mean KL divergence to FP on corpus" in table and "| BAQ model |" in table
    for name in ("kl.png", "beta.png", "linearity.png", "model-bits-heatmap.png"):
        assert (out / name).stat().st_size > 1024
    # a run cached before KL existed is quantized again and only evaluated
    path = next(out.glob("gptq-3b-*.json"))
    cached = json.loads(path.read_text())
    del cached["kl"]
    path.write_text(json.dumps(cached))
    n = len(calls["quantize"])
    run(tiny_model_dir, text, out, *grid)
    assert len(calls["quantize"]) == n + 1
    assert json.loads(path.read_text())["kl"]["corpus"] == results["gptq-3b"]["kl"]["corpus"]


def test_correlations_against_slow_definitions():
    from baq.bench import plots

    xs = [1.0, 2.0, 5.0, 3.0, 10.0]
    ys = [2.0, 1.0, 50.0, 4.0, 20.0]
    assert plots.rank_correlation(xs, ys) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    assert plots.log_correlation(list(zip(xs, [3 * x**2 for x in xs]))) == pytest.approx(1.0)
    row = {"layers": [{"name": "a", "loss": 2.0}, {"name": "b", "loss": 3.0}]}
    assert plots.predicted_kl(row, {"a": 0.5, "b": 2.0}) == pytest.approx(7.0)
    assert plots.predicted_kl(row, {"a": 0.5}) is None

"""``baq bench``: a grid of quantization runs on one model, each cached as soon as it finishes.

A run is one method at one bit budget (or the unquantized model, ``fp``). Its JSON lands in the
output folder under ``<name>-<key>.json``, where ``key`` hashes everything that determines the
quantized weights (model, dtype, calibration text by content and windows, the
:class:`QuantConfig`), so an interrupted or extended grid only runs what is missing and a change
of settings never reuses a stale result. Evaluation sets are cached inside a run, each with the
hash of its text: adding a set (``--eval ptb-test.txt``) re-quantizes the cached runs, checks
that the layers come out as before, and evaluates only the new set.
The model is loaded once; each run starts from a CPU copy of its original weights, because
quantization rewrites the linears in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from baq import atomic, data
from baq.bench import plots
from baq.bench.grid import (
    BENCH_VERSION,
    PROTOCOL_CALIB_START,
    BenchSettings,
    BenchSpec,
    Entry,
    cache_entries,
    eval_sources,
    load_result,
    missing_sets,
    select,
)
from baq.config import DEFAULT_TOPK, QuantConfig
from baq.eval.divergence import BaseRecord, windows_digest
from baq.eval.scoring import score, score_sets
from baq.model import blocks, loader
from baq.quant.layer import quantize_layer
from baq.run import report
from baq.run.measure import (
    Measurement,
    config_settings,
    depends_on_bits,
    measure_model,
    settings_of,
)
from baq.run.session import Session, run_session

log = logging.getLogger(__name__)


def resolve_calib_start(settings: BenchSettings, ntokens: int) -> int:
    """``calib_start`` if given; else 150000 when the text has room, else the first token after
    the evaluation windows, so calibration and evaluation never share tokens."""
    if settings.calib_start is not None:
        return settings.calib_start
    if ntokens - settings.seqlen > PROTOCOL_CALIB_START:
        return PROTOCOL_CALIB_START
    start = settings.eval_windows * settings.eval_seqlen
    log.warning("text has %d tokens: calibration windows start at %d, not 150000", ntokens, start)
    return start


def prepare_data(settings: BenchSettings, tokenizer: Any) -> tuple[Tensor, dict[str, Tensor], dict]:
    """Tokenise the texts once; cut calibration and evaluation windows.

    Returns:
        ``(calib, sets, info)``: (nsamples, seqlen) windows; name -> (n, eval_seqlen) windows, the
        first ``eval_windows`` of each text (fewer if it is shorter); what was actually used.
    """
    tokens = {
        src: data.tokenize(tokenizer, data.load_text(src, split="test"))
        for src in dict.fromkeys((settings.text, *settings.evals))
    }
    sets = {}
    for name, src in eval_sources(settings).items():
        fit = tokens[src].numel() // settings.eval_seqlen
        if 0 < fit < settings.eval_windows:
            log.warning("%s holds only %d windows of %d tokens", name, fit, settings.eval_seqlen)
        n = min(settings.eval_windows, max(fit, 1))
        sets[name] = data.eval_windows(tokens[src], settings.eval_seqlen, n)
    main = tokens[settings.text]
    start = resolve_calib_start(settings, main.numel())
    calib = data.calibration_windows(main, settings.nsamples, settings.seqlen, settings.seed, start)
    info = {
        "text_tokens": main.numel(),
        "calib_start": start,
        "eval_windows": {k: len(v) for k, v in sets.items()},
    }
    return calib, sets, info


def estimate_seconds(
    model: nn.Module,
    specs: Sequence[BenchSpec],
    calib: Tensor,
    eval_tokens: Sequence[int],
    sets: dict[str, Tensor],
    device: torch.device,
) -> list[float]:
    """Rough seconds per run from one timed forward and one timed GPTQ solve of block 0.

    A run costs its evaluation tokens (``eval_tokens``, one count per spec), none (RTN reads no
    data) or two (Hessians, then propagation) passes over the calibration tokens at the same
    per-token cost, and zero, one or two (BAQ measured) solves of every linear. Attention makes
    short calibration windows cheaper per token than a 2048-token window, so this errs long.
    """
    window = next(iter(sets.values()))[:1].to(device)
    layers = blocks.decoder_layers(model)
    gptq = QuantConfig(method="gptq", bits=3)
    model.to(device)
    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=window, use_cache=False)
        per_token = (time.perf_counter() - t) / window.numel()
        t = time.perf_counter()
        for W in (blocks.get_weight(m).float() for m in blocks.linears(layers[0]).values()):
            quantize_layer(W, torch.eye(W.shape[1], device=W.device), gptq)  # cost ignores H
        solve = (time.perf_counter() - t) * len(layers)
    model.to("cpu")
    passes, solves = per_token * calib.numel(), []
    for cfg in (spec.cfg for spec in specs):
        method = "fp" if cfg is None else cfg.method
        measured = method == "baq" and cfg.sensitivity == "measured"
        solves.append({"fp": (0, 0), "rtn": (0, 0)}.get(method, (2, 1 + measured)))
    return [per_token * e + p * passes + n * solve for e, (p, n) in zip(eval_tokens, solves)]


def run_one(
    model: nn.Module,
    entry: Entry,
    calib: Tensor,
    sets: dict[str, Tensor],
    device: torch.device,
    base: dict[str, BaseRecord] | None = None,
) -> dict[str, Any]:
    """Quantize (unless FP) and evaluate ``sets``; the model must hold its original weights.

    Returns:
        The run's result: perplexity per set, nominal and storage bits, seconds, peak memory and
        one row per quantized layer. The model is left quantized (the caller restores it).
    """
    spec, cfg = entry.spec, entry.spec.cfg
    peak_is_own = report.reset_peak_memory()  # the peak of this run, not of the whole grid
    first = next(iter(blocks.linears(blocks.decoder_layers(model)[0]).values()))
    nominal = storage = float(first.weight.element_size() * 8)  # FP: the dense weights
    seconds, records, measurement = {"quantize": 0.0}, [], None
    if cfg is None:  # FP is the base: its KL is 0 by definition
        ppl, kl, seconds["eval"] = evaluate_sets(model, sets, device, spec.name)
    else:
        info: dict[str, Any] = {}

        def cached(model: nn.Module, calib: Tensor, cfg: QuantConfig, device: Any):
            meas, info["measurement"] = bench_measurement(model, entry, calib, device)
            return meas, False

        session = Session(cfg=cfg, device=str(device), evaluate_before=False, progress=None)
        result = run_session(
            model, None, calib, session, sets, base_records=base, measurement_source=cached
        )
        rep = result.report
        if result.measurement is not None:
            measurement = info.get("measurement")
            seconds["measure"] = sum(result.measurement.seconds.values())
        seconds["quantize"], records = result.run.seconds, result.run.records
        nominal, storage = result.run.nominal_bits, rep["storage_bits"]
        ppl = {name: v["after"] for name, v in rep["perplexity"].items()}
        kl, seconds["eval"] = rep["divergence"], rep["seconds"].get("eval_after", 0.0)
    return {
        "bench_version": BENCH_VERSION,
        "name": spec.name,
        "key": entry.key,
        "family": spec.family,
        "label": spec.label,
        "bits": None if cfg is None else cfg.bits,
        "settings": entry.settings,
        "perplexity": ppl,
        "kl": kl,
        "eval_digests": {name: entry.evals[name] for name in ppl},
        "measurement": measurement,
        "nominal_bits": nominal,
        "storage_bits": storage,
        "seconds": seconds,
        "memory": {**report.peak_memory(), "peak_is_run": peak_is_own},
        "device": str(device),
        "environment": report.environment(),
        "layers": report.layer_rows(records),
    }


def evaluate_sets(
    model: nn.Module,
    sets: dict[str, Tensor],
    device: torch.device,
    tag: str,
    base: dict[str, BaseRecord] | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]], float]:
    """Perplexity of ``model`` on each set of windows, its KL statistics against the float
    model where ``base`` has the set's record, and the seconds it took."""
    t = time.perf_counter()
    model.to(device)
    scored = score_sets(model, sets, device, tag, base_records=base)
    ppl = {name: sc.perplexity for name, sc in scored.items()}
    kl = {name: sc.divergence for name, sc in scored.items() if sc.divergence is not None}
    model.to("cpu")
    return ppl, kl, time.perf_counter() - t


def bench_measurement(
    model: nn.Module, entry: Entry, calib: Tensor, device: torch.device
) -> tuple[Measurement, dict[str, Any]]:
    """The model allocation's measurement of this run's model and calibration, cached in the
    output folder beside the runs (one per settings it depends on), measured when missing.

    Returns:
        The measurement and what the run records of it (file, whether it was cached).
    """
    from baq.run import checkpoint

    cfg = entry.spec.cfg
    assert cfg is not None
    path = measurement_path(entry)
    if path.is_file():
        return Measurement.load(path), {"file": path.name, "cached": True}
    digest = checkpoint.tensor_digest(model.state_dict().items())
    # a measurement of the same model and data made another way (``baq measure`` of both
    # estimators, copied into the folder) serves as well
    settings = settings_of(digest, calib, cfg)
    for other in sorted(path.parent.glob("measurement-*.safetensors")):
        try:
            meas = Measurement.load(other)
            meas.check(settings)
            meas.betas(cfg.importance)
        except ValueError:
            continue
        return meas, {"file": other.name, "cached": True}
    meas = measure_model(model, calib, cfg, (cfg.importance,), device, digest)
    meas.save(path)
    return meas, {"file": path.name, "cached": False}


def measurement_path(entry: Entry) -> Path:
    """Where the measurement of a model-allocation run is cached: keyed by what it depends on
    (model, data, the measured settings, the estimator), so runs at other budgets share it."""
    cfg = entry.spec.cfg
    assert cfg is not None
    src = {k: entry.settings[k] for k in ("bench_version", "model", "dtype", "calib", "eval")}
    src |= config_settings(cfg) | {"importance": cfg.importance}
    if not depends_on_bits(src):
        del src["bits"]
    key = hashlib.sha256(json.dumps(src, sort_keys=True, default=list).encode()).hexdigest()[:12]
    return entry.path.parent / f"measurement-{cfg.importance}-{key}.safetensors"


def base_records(
    model: nn.Module, sets: dict[str, Tensor], device: torch.device, out: Path
) -> dict[str, BaseRecord]:
    """The float model's compact log-probabilities of each set (KL's base side), cached in the
    output folder by the windows' hash and computed from the model's original weights when
    missing (one evaluation pass per set)."""
    records = {}
    for name, windows in sets.items():
        path = out / f"base-{windows_digest(windows)}-top{DEFAULT_TOPK}.safetensors"
        if path.is_file():
            records[name] = BaseRecord.load(path)
            continue
        model.to(device)
        sc = score(model, windows, device, f"base {name}", record_topk=DEFAULT_TOPK)
        model.to("cpu")
        sc.base_record.save(path)
        records[name] = sc.base_record
    return records


def same_quantization(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two results of one run quantized alike: same rates, level counts and layer losses."""
    if (a["nominal_bits"], a["storage_bits"]) != (b["nominal_bits"], b["storage_bits"]):
        return False
    if len(a["layers"]) != len(b["layers"]):
        return False
    for x, y in zip(a["layers"], b["layers"], strict=True):
        if x["name"] != y["name"] or x["level_histogram"] != y["level_histogram"]:
            return False
        if not math.isclose(x["loss"], y["loss"], rel_tol=1e-6, abs_tol=1e-12):
            return False
    return True


def complete_run(
    model: nn.Module,
    entry: Entry,
    cached: dict[str, Any] | None,
    calib: Tensor,
    sets: dict[str, Tensor],
    device: torch.device,
    base: dict[str, BaseRecord] | None = None,
) -> dict[str, Any]:
    """The run's result with every set of ``entry`` evaluated, reusing what ``cached`` holds.

    A cached run that lacks some sets is quantized again and, if it comes out as before, only
    the missing sets are evaluated; if not (other code, threads or hardware), all of them are,
    and the fresh result replaces the cached one.
    """
    missing = missing_sets(entry, cached)
    result = run_one(model, entry, calib, {n: sets[n] for n in missing}, device, base)
    if cached is not None and same_quantization(cached, result):
        merged = dict(cached)
        merged["perplexity"] = {**cached["perplexity"], **result["perplexity"]}
        merged["kl"] = {**cached.get("kl", {}), **result["kl"]}
        merged["eval_digests"] = {**cached.get("eval_digests", {}), **result["eval_digests"]}
        merged["seconds"] = dict(cached["seconds"])
        merged["seconds"]["eval"] = cached["seconds"].get("eval", 0.0) + result["seconds"]["eval"]
        result = merged
    elif cached is not None:
        log.warning("%s quantized differently from its cache: every set evaluated", entry.spec.name)
        rest = {n: w for n, w in sets.items() if n in entry.evals and n not in missing}
        more, kl, spent = evaluate_sets(model, rest, device, entry.spec.name, base)
        result["perplexity"].update(more)
        result["kl"].update(kl)
        result["eval_digests"].update({n: entry.evals[n] for n in more})
        result["seconds"]["eval"] += spent
    order = [*entry.evals, *result["perplexity"]]  # the planned sets first, in their order
    result["perplexity"] = {n: result["perplexity"][n] for n in dict.fromkeys(order)}
    return result


def run_bench(
    settings: BenchSettings,
    grid: Sequence[BenchSpec],
    out: str | os.PathLike,
    only: Sequence[str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the missing runs of the grid (those matching ``only``), then write tables and plots.

    A run is missing when it has no cached result or its result lacks one of the evaluation
    sets (then only those are evaluated, see :func:`complete_run`).

    Args:
        settings: model and data.
        grid: the runs, e.g. from :func:`build_grid`.
        out: cache and output folder.
        only: fnmatch patterns of run names to run (None: all).
        echo: receives the time estimate and one line per finished run (default: the log).
    Returns:
        The cached results of the whole grid, in grid order.
    """
    echo = echo or log.info
    entries = cache_entries(settings, grid, out)
    todo = [(e, r) for e in select(entries, only) if missing_sets(e, r := load_result(e))]
    if todo:
        device = loader.resolve_device(settings.device)
        model, tok = loader.load_model(settings.model, settings.gguf_file, settings.dtype, "cpu")
        calib, sets, info = prepare_data(settings, tok)
        original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        tokens = [sum(sets[n].numel() for n in missing_sets(e, r)) for e, r in todo]
        costs = estimate_seconds(model, [e.spec for e, _ in todo], calib, tokens, sets, device)
        echo(f"{len(todo)} of {len(entries)} runs to do, estimated {_hms(sum(costs))}")
        base = base_records(model, sets, device, Path(out))
        spent = 0.0
        for i, (entry, cached) in enumerate(todo):
            t = time.perf_counter()
            result = complete_run(model, entry, cached, calib, sets, device, base)
            result["data"] = info
            report.write_json(entry.path, result)
            if entry.spec.cfg is not None:  # quantization rewrote the linears in place
                model.load_state_dict(original)
            spent += time.perf_counter() - t
            left = sum(costs[i + 1 :]) * spent / max(sum(costs[: i + 1]), 1e-9)
            echo(f"{progress_line(result)}  [{i + 1}/{len(todo)}, ~{_hms(left)} left]")
            write_outputs(out, entries, draw=False)  # a partial grid still has a table
    return write_outputs(out, entries)


def progress_line(result: dict[str, Any]) -> str:
    ppl = ", ".join(f"{k} {v:.3f}" for k, v in result["perplexity"].items())
    kl = result.get("kl") or {}
    if kl:
        ppl += "; KL " + ", ".join(f"{k} {v['kl_mean']:.4f}" for k, v in kl.items())
    return (
        f"{result['name']}: ppl {ppl}; {result['nominal_bits']:.3f} nominal / "
        f"{result['storage_bits']:.3f} storage bits; {sum(result['seconds'].values()):.1f} s"
    )


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def format_plan(entries: list[Entry]) -> str:
    """The grid with each run's cache status, for ``--list``."""
    width = max(len(e.spec.name) for e in entries)
    lines = []
    for e in entries:
        result = load_result(e)
        lacking = missing_sets(e, result)
        status = "missing" if result is None else "cached"
        if result is not None and lacking:
            status = f"cached, not evaluated on {', '.join(lacking)}"
        lines.append(f"{e.spec.name:<{width}}  {e.key}  {status}")
    return "\n".join(lines)


def write_outputs(out: str | os.PathLike, entries: list[Entry], draw: bool = True) -> list[dict]:
    """Write ``results.json``, ``results.md`` and (``draw``) the PNGs from the cached runs.

    Returns:
        The cached results, in grid order.
    """
    out = Path(out)
    results = {e.spec.name: _planned_sets(e, r) for e in entries if (r := load_result(e))}
    missing = [e.spec.name for e in entries if e.spec.name not in results]
    report.write_json(out / "results.json", {"runs": list(results.values()), "missing": missing})
    rows = [(e.spec.name, e.spec.label, e.spec.cfg and e.spec.cfg.bits) for e in entries]
    _write_text(out / "results.md", plots.format_table(rows, results))
    if draw:
        plots.write_plots(list(results.values()), out, cached_betas(out))
    return list(results.values())


def cached_betas(out: Path) -> dict[str, dict[str, float]]:
    """Estimator -> layer -> beta from the measurements cached in ``out`` (newest of each)."""
    found: dict[str, dict[str, float]] = {}
    for path in sorted(out.glob("measurement-*.safetensors"), key=lambda p: p.stat().st_mtime):
        try:
            found.update(Measurement.load(path).beta)
        except ValueError as err:
            log.warning("ignoring %s (%s)", path, err)
    return found


def _write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)  # readers never see half a table


def _planned_sets(entry: Entry, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` showing only the evaluation sets of this grid (a cache may hold more)."""
    ppl = {n: result["perplexity"][n] for n in entry.evals if n in result["perplexity"]}
    return {**result, "perplexity": ppl}

"""The markdown table and PNG plots of a ``baq bench`` grid, from its cached results (``bench.py``).

Figures are built on matplotlib's Agg canvas directly, never through ``pyplot``, so plotting
neither needs a display nor switches the backend of a program that imports ``baq``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

log = logging.getLogger(__name__)

Result = dict[str, Any]
HEATMAP_BITS = (2.0, 3.0)
# BAQ runs shown by the per-layer plots: the plain measured-sensitivity family, no variants
BAQ_LABEL = "BAQ measured"
MODEL_LABEL = "BAQ model"  # the model-level allocation's family (bench_grid.py FAMILIES)


def write_plots(
    results: list[Result], out: str | Path, beta: dict[str, dict[str, float]] | None = None
) -> list[Path]:
    """Draw every plot of the grid into ``out``.

    Args:
        results: cached run results, in grid order.
        out: folder for the PNGs.
        beta: estimator -> layer -> importance, from the grid's cached measurements (the
            model-level allocation's); the beta and linearity plots need them.
    Returns:
        The paths written: perplexity.png, kl.png, bits-heatmap.png, model-bits-heatmap.png,
        level-histogram.png, predicted-gain.png, adadim.png, and with ``beta`` beta.png and
        linearity.png.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawers = {
        "perplexity.png": plot_perplexity,
        "kl.png": plot_kl,
        "bits-heatmap.png": plot_bits_heatmap,
        "model-bits-heatmap.png": lambda r: plot_bits_heatmap(r, MODEL_LABEL, None),
        "level-histogram.png": plot_level_histogram,
        "predicted-gain.png": plot_predicted_gain,
        "adadim.png": plot_dim_choice,
    }
    if beta:
        drawers["beta.png"] = lambda r: plot_beta(beta)
        if "fisher" in beta:
            drawers["linearity.png"] = lambda r: plot_linearity(r, beta["fisher"])
    paths = []
    for name, draw in drawers.items():
        fig = draw(results)
        FigureCanvasAgg(fig)
        fig.savefig(out / name, dpi=120)
        paths.append(out / name)
    log.info("wrote %d plots to %s", len(paths), out)
    return paths


def _figure(panels: int, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _baq_run(results: list[Result], bits: float) -> Result | None:
    return next((r for r in results if r["label"] == BAQ_LABEL and r["bits"] == bits), None)


def plot_perplexity(results: list[Result]) -> Figure:
    """Perplexity against storage bits per weight, one line per method, one panel per eval set;
    FP is a horizontal line (its dense bits would squash the axis)."""
    return _plot_against_bits(results, lambda r, s: r["perplexity"].get(s), "perplexity", True)


def plot_kl(results: list[Result]) -> Figure:
    """Mean KL divergence against the float model by storage bits per weight (FP is 0)."""

    def kl(r: Result, s: str) -> float | None:
        return (r.get("kl") or {}).get(s, {}).get("kl_mean")

    return _plot_against_bits(results, kl, "KL divergence to FP", False)


def _plot_against_bits(results: list[Result], metric, ylabel: str, fp_line: bool) -> Figure:
    sets = list(dict.fromkeys(k for r in results for k in r["perplexity"]))
    fig, axes = _figure(max(len(sets), 1))
    if not sets:
        _empty(axes[0], "no runs cached yet")
        return fig
    for ax, name in zip(axes, sets):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in results:
            value = metric(r, name)
            if r.get("family") == "fp":  # transcribed runs (frontier.load_runs) carry no family
                if fp_line and _finite(value):
                    ax.axhline(value, color="black", linestyle="--", label=f"FP ({value:.2f})")
            elif _finite(value):  # a diverged run (inf or nan) has no place on a log axis
                lines[r["label"]].append((r["storage_bits"], value))
        for label, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        if not lines and not fp_line:
            _empty(ax, f"no {ylabel} measured on {name} yet")
            continue
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        low, high = ax.get_ylim()
        if high / low < 10:  # less than a decade has no major tick: label the minor ones
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("storage bits per weight")
        ax.set_ylabel(f"{ylabel} ({name})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_linearity(results: list[Result], beta: dict[str, float]) -> Figure:
    """The model-level loss model's check: predicted ``sum_l beta_l loss_l`` (each run's
    measured layer losses priced by the Fisher ``beta``) against the measured mean KL divergence,
    over every GPTQ/BAQ run; log-log, with the diagonal and the correlation of the logs."""
    sets = list(dict.fromkeys(k for r in results for k in (r.get("kl") or {})))
    fig, axes = _figure(max(len(sets), 1))
    for ax, name in zip(axes, sets or [""]):
        pts = []
        for r in results:
            kl = (r.get("kl") or {}).get(name, {}).get("kl_mean")
            pred = predicted_kl(r, beta)
            if _finite(kl) and _finite(pred):
                pts.append((pred, kl, r["label"]))
        if len(pts) < 2:
            _empty(ax, "fewer than two GPTQ/BAQ runs with KL and layer losses")
            continue
        for label in dict.fromkeys(p[2] for p in pts):
            ax.scatter(
                [p[0] for p in pts if p[2] == label],
                [p[1] for p in pts if p[2] == label],
                label=label,
            )
        lo = min(min(p[0], p[1]) for p in pts)
        hi = max(max(p[0], p[1]) for p in pts)
        ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", label="predicted = measured")
        ax.set_xscale("log")
        ax.set_yscale("log")
        r = log_correlation([(p[0], p[1]) for p in pts])
        ax.set_title(f"{name}: correlation of logs {r:.3f} over {len(pts)} runs")
        ax.set_xlabel("predicted KL: sum_l beta_l loss_l (Fisher beta)")
        ax.set_ylabel("measured mean KL divergence")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def predicted_kl(result: Result, beta: dict[str, float]) -> float | None:
    """``sum_l beta_l loss_l`` of a run's layer rows, or None when a layer has no ``beta`` or no
    loss (RTN solves without a Hessian)."""
    rows = result.get("layers") or []
    if not rows or any(r["name"] not in beta or not r["loss"] for r in rows):
        return None
    return sum(beta[r["name"]] * r["loss"] for r in rows)


def log_correlation(points: list[tuple[float, float]]) -> float:
    """Pearson correlation of ``(log x, log y)``."""
    return pearson([math.log(x) for x, _ in points], [math.log(y) for _, y in points])


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def plot_beta(estimates: dict[str, dict[str, float]]) -> Figure:
    """Per-layer importance ``beta_l`` of each estimator (log scale, layers in model order), and
    one estimator against the other with their rank correlation."""
    fig, (left, right) = _figure(2, width=6.0)
    if not estimates:
        _empty(left, "no measurement cached yet")
        right.set_axis_off()
        return fig
    names = list(next(iter(estimates.values())))
    for est, beta in estimates.items():
        left.plot(range(len(names)), [beta.get(n, math.nan) for n in names], label=est, lw=0.8)
    left.set_yscale("log")
    left.set_xlabel("layer (model order: 7 linears per block)")
    left.set_ylabel("beta_l")
    left.legend()
    left.grid(True, which="both", alpha=0.3)
    if len(estimates) < 2:
        _empty(right, "one estimator measured")
        return fig
    (a, ba), (b, bb) = list(estimates.items())[:2]
    common = [n for n in names if n in ba and n in bb and ba[n] > 0 and bb[n] > 0]
    right.scatter([ba[n] for n in common], [bb[n] for n in common], s=8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel(f"beta ({a})")
    right.set_ylabel(f"beta ({b})")
    rho = rank_correlation([ba[n] for n in common], [bb[n] for n in common])
    right.set_title(f"Spearman rank correlation {rho:.3f} over {len(common)} layers")
    right.grid(True, which="both", alpha=0.3)
    return fig


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties broken by order)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    return pearson(ranks(x), ranks(y))


def _block_and_module(name: str) -> tuple[int, str] | None:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``."""
    match = re.match(r"^(?:.*?\.)?(\d+)\.(.+)$", name)
    return None if match is None else (int(match.group(1)), match.group(2))


def _short_names(modules: list[str]) -> dict[str, str]:
    """Last name component (``q_proj``) where it is unique in the block, else the full path."""
    last = [m.rsplit(".", 1)[-1] for m in modules]
    return {m: s if last.count(s) == 1 else m for m, s in zip(modules, last)}


def _layer_bits(row: dict[str, Any]) -> tuple[float, float]:
    """Mean and standard deviation of ``log2 L_j`` over a layer's columns."""
    hist = {int(L): int(n) for L, n in row["level_histogram"].items()}
    cols = sum(hist.values())
    mean = sum(n * math.log2(L) for L, n in hist.items()) / cols
    var = sum(n * (math.log2(L) - mean) ** 2 for L, n in hist.items()) / cols
    return mean, math.sqrt(var)


def plot_bits_heatmap(
    results: list[Result], label: str = BAQ_LABEL, half_span: float | None = 0.5
) -> Figure:
    """Per layer (rows: blocks; columns: modules) of BAQ at 2 and 3 bits: the nominal bits (top;
    with per-layer budgets every layer meets it, so the scale spans +-``half_span`` bit to keep
    rounding from looking like structure; None: the data's own range, for the model-level
    allocation) and the spread of the per-column bits (bottom: how unequal the allocation is)."""
    fig = Figure(figsize=(4.5 * len(HEATMAP_BITS), 11.0), layout="constrained")
    for i, bits in enumerate(HEATMAP_BITS):
        top = fig.add_subplot(2, len(HEATMAP_BITS), i + 1)
        bottom = fig.add_subplot(2, len(HEATMAP_BITS), len(HEATMAP_BITS) + i + 1)
        run = next((r for r in results if r["label"] == label and r["bits"] == bits), None)
        rows = (run or {}).get("layers", [])
        if not any(_block_and_module(row["name"]) for row in rows):
            _empty(top, f"no {label} run at {bits:g} bits")
            bottom.set_axis_off()
            continue
        for ax, k, title, span in (
            (top, 0, "nominal bits", _span(bits, half_span)),
            (bottom, 1, "std of per-column bits", (None, None)),
        ):
            blocks, modules, grid = layer_grid(rows, lambda row, k=k: _layer_bits(row)[k])
            image = ax.imshow(
                grid, aspect="auto", interpolation="nearest", vmin=span[0], vmax=span[1]
            )
            _layer_axes(ax, blocks, modules)
            ax.set_title(f"{label}, {bits:g} bits: {title}")
            fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def layer_grid(
    rows: list[dict[str, Any]], value: Any
) -> tuple[list[int], list[str], list[list[float]]]:
    """``value(row)`` of every block linear of a run's ``layers`` rows, as blocks (down) x
    modules (across): the blocks, the modules, and the grid (NaN where a block lacks the module:
    skipped linears; rows outside the blocks, the head, are left out)."""
    cells = [
        (*where, value(row))
        for row in rows
        if (where := _block_and_module(row["name"])) is not None
    ]
    blocks = sorted({c[0] for c in cells})
    modules = list(dict.fromkeys(c[1] for c in cells))
    grid = [[math.nan] * len(modules) for _ in blocks]
    for block, module, v in cells:
        grid[blocks.index(block)][modules.index(module)] = v
    return blocks, modules, grid


def _layer_axes(ax: Any, blocks: list[int], modules: list[str]) -> None:
    """Module names across, every few block numbers down, for a :func:`layer_grid` image."""
    short = _short_names(modules)
    ax.set_xticks(range(len(modules)), [short[m] for m in modules], rotation=45, ha="right")
    step = max(1, len(blocks) // 15)
    ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]])
    ax.set_ylabel("block")


def dim_choice_grid(run: Result) -> tuple[list[int], list[str], list[list[float]]]:
    """The grid dimension of every layer of ``run``: blocks, modules, and 1.0 where the layer is
    per-IC, 0.0 per-OC, NaN where the run has no such layer (the head, skipped linears)."""
    return layer_grid(run.get("layers", []), lambda row: 1.0 if row.get("dim") == "ic" else 0.0)


def plot_dim_choice(results: list[Result]) -> Figure:
    """Which layers AdaDim (``--dim auto``) put on per-IC grids, one panel per such run (each
    budget, criterion and allocation): blocks down, modules across, IC dark."""
    runs = [r for r in results if r.get("settings", {}).get("quant", {}).get("dim") == "auto"]
    fig, axes = _figure(max(1, len(runs)), 3.6, 6.0)
    if not runs:
        _empty(axes[0], "no --dim auto run")
        return fig
    for ax, run in zip(axes, runs):
        blocks, modules, grid = dim_choice_grid(run)
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1.4)
        _layer_axes(ax, blocks, modules)
        n_ic = sum(v == 1.0 for row in grid for v in row)
        n_all = sum(not math.isnan(v) for row in grid for v in row)
        ax.set_title(f"{run['name']}\nper-IC (dark): {n_ic} of {n_all}", fontsize=9)
    return fig


def _span(bits: float, half: float | None) -> tuple[float | None, float | None]:
    return (None, None) if half is None else (bits - half, bits + half)


def plot_level_histogram(results: list[Result]) -> Figure:
    """How many columns got each level count, summed over layers, for BAQ at 2 and 3 bits."""
    fig, axes = _figure(len(HEATMAP_BITS))
    for ax, bits in zip(axes, HEATMAP_BITS):
        run = _baq_run(results, bits)
        counts: dict[int, int] = defaultdict(int)
        for row in (run or {}).get("layers", []):
            for levels, n in row["level_histogram"].items():
                counts[int(levels)] += int(n)
        if not counts:
            _empty(ax, f"no {BAQ_LABEL} run at {bits:g} bits")
            continue
        levels = sorted(counts)
        # bars as wide as a fixed fraction of an octave look alike on the log2 axis
        ax.bar(levels, [counts[L] for L in levels], width=[0.1 * L for L in levels])
        ax.axvline(2**bits, color="black", linestyle="--", label=f"uniform {bits:g} bits")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_yscale("log")
        ax.set_xlabel("levels per column")
        ax.set_ylabel("columns (all layers)")
        ax.set_title(f"{BAQ_LABEL}, {bits:g} bits")
        ax.legend(fontsize="small")
    return fig


def plot_predicted_gain(results: list[Result]) -> Figure:
    """Per layer: predicted gain geomean(c)/mean(c) against the measured BAQ/GPTQ loss ratio,
    log-log, one colour per bit budget, with the diagonal (prediction exact)."""
    fig, axes = _figure(1, width=5.5, height=5.0)
    ax = axes[0]
    lo, hi = math.inf, 0.0
    for r in results:
        if r["label"] != BAQ_LABEL:
            continue
        points = [
            (row["predicted_gain"], row["loss_ratio"])
            for row in r["layers"]
            if _finite(row.get("predicted_gain")) and _finite(row.get("loss_ratio"))
        ]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, s=10, alpha=0.6, label=f"{r['bits']:g} bits")
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
    if hi == 0.0:
        _empty(ax, f"no {BAQ_LABEL} run with measured layer losses")
        return fig
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted gain geomean(c) / mean(c)")
    ax.set_ylabel("measured loss ratio BAQ / GPTQ")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def format_table(runs: list[tuple[str, str, float | None]], results: dict[str, Result]) -> str:
    """Markdown: perplexity by method and bits on each evaluation set, then one row per run.

    Args:
        runs: the grid as (name, label, bits or None for FP), in order; missing runs say so.
        results: run name -> cached result.
    Returns:
        The markdown text.
    """
    sets = list(dict.fromkeys(k for r in results.values() for k in r["perplexity"]))
    lines = ["# baq bench", ""]
    quant = [run for run in runs if run[2] is not None]
    budgets = sorted({bits for _, _, bits in quant})
    for ev in sets if quant else []:
        fp = results.get("fp", {}).get("perplexity", {}).get(ev)
        lines += [f"Perplexity on {ev}" + (f" (FP {fp:.3f}):" if fp else ":"), ""]
        lines += ["| method | " + " | ".join(f"{b:g} bits" for b in budgets) + " |"]
        lines += ["|---" * (len(budgets) + 1) + "|"]
        for label in dict.fromkeys(label for _, label, _ in quant):
            cells = {bits: results.get(name) for name, lab, bits in quant if lab == label}
            row = [_num(cells[b]["perplexity"].get(ev)) if cells.get(b) else "" for b in budgets]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
        if not any(ev in (r.get("kl") or {}) for r in results.values()):
            continue
        lines += [f"Mean KL divergence to FP on {ev} (same top token, %):", ""]
        lines += ["| method | " + " | ".join(f"{b:g} bits" for b in budgets) + " |"]
        lines += ["|---" * (len(budgets) + 1) + "|"]
        for label in dict.fromkeys(label for _, label, _ in quant):
            cells = {bits: results.get(name) for name, lab, bits in quant if lab == label}
            row = [_kl_cell((cells.get(b) or {}).get("kl", {}).get(ev)) for b in budgets]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    head = ["run", "method", "bits", *(f"ppl {s}" for s in sets), *(f"KL {s}" for s in sets)]
    head += ["nominal bits", "storage bits", "measure s", "quantize s", "eval s", "peak GiB"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, label, bits in runs:
        r = results.get(name)
        if r is None:
            cells = ["not run"] + [""] * (len(head) - 4)
        else:
            cells = [_num(r["perplexity"].get(s)) for s in sets]
            cells += [_kl_num((r.get("kl") or {}).get(s)) for s in sets]
            cells += [f"{r['nominal_bits']:.3f}", f"{r['storage_bits']:.3f}"]
            cells += [f"{r['seconds'].get(k, 0.0):.1f}" for k in ("measure", "quantize", "eval")]
            cells.append(_peak(r.get("memory", {})))
        shown = "" if bits is None else f"{bits:g}"
        lines.append(f"| {name} | {label} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _peak(memory: dict[str, Any]) -> str:
    """A run's peak memory, CUDA's when it ran there; '<=' marks an upper bound, a resident peak
    counted from process start that an earlier run of the same process may have set."""
    peak = memory.get("peak_cuda_gib", memory.get("peak_rss_gib"))
    if peak is None:
        return ""
    return f"{peak:.2f}" if memory.get("peak_is_run") else f"<= {peak:.2f}"


def _kl_num(kl: dict[str, float] | None) -> str:
    return "" if not kl else f"{kl['kl_mean']:.4f}"


def _kl_cell(kl: dict[str, float] | None) -> str:
    if not kl:
        return ""
    return f"{kl['kl_mean']:.4f} ({100 * kl['kl_top_token_agreement']:.1f})"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}" if x < 1e4 else f"{x:.3g}"

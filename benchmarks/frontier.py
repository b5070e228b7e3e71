"""Perplexity against storage bits: every run of one or more ``baq bench`` folders, with the peers.

    python benchmarks/frontier.py SOURCE [SOURCE ...] [--set wikitext2-test] [--out DIR]

Reads each source's runs (a bench folder's cached runs, a bench ``results.md`` table, or a
JSON list of runs: :func:`load_runs`), draws
``frontier.png`` (one point per run, the runs on the frontier joined, the peers of
``../shared/PEERS.md`` beside them) and prints the frontier: the runs that no other run beats at
equal or fewer storage bits. Only valid for the reference model under the standard protocol, the
one the peers were measured on (PEERS.md).

The peers' bits are not all storage bits: the published RTN, GPTQ and BAQ count ``log2 L`` per
weight and no grid ranges (the published BAQ would need 2.23 / 3.31 / 4.38 bits in whole-bit
codes), so they are drawn at their nominal bits, a lower bound of what they would store; the
llama.cpp k-quants' bits are the GGUF tensor sizes of the 210 decoder linears, scales included,
comparable with our storage bits.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# ../shared/PEERS.md, WikiText-2 test, 32 x 2048 tokens, FP 21.81: (label, bits, perplexity)
PEERS = {
    "published RTN (nominal bits)": [(2, 5.27e6), (3, 668.0), (4, 39.67)],
    "published GPTQ (nominal bits)": [(2, 4.78e5), (3, 117.3), (4, 34.89)],
    "published BAQ (nominal bits)": [(2, 5.14e4), (3, 59.73), (4, 27.40)],
    "llama.cpp k-quants": [(4.234, 32.80), (4.634, 26.69), (5.534, 24.56)],
    "llama.cpp k-quants + imatrix": [(4.234, 27.63), (4.634, 24.98), (5.534, 23.85)],
}
FP_PERPLEXITY = 21.81


def load_runs(sources: list[Path], eval_set: str) -> list[dict]:
    """The quantized runs with a perplexity on ``eval_set`` (a run name present in several sources
    is taken from the first).

    A source is a ``baq bench`` folder (its cached runs' JSON files), a bench table
    ``results.md`` (the per-run rows: run, method, bits, ``ppl <set>`` ..., storage bits) or a
    JSON list of runs
    ``{"name", "label", "storage_bits", "perplexity": {set: ppl}}`` (runs whose cache is gone,
    transcribed from docs/RESULTS.md).
    """
    runs: dict[str, dict] = {}
    for src in sources:
        if src.is_dir():  # every cached run, not only the last grid's (results.json)
            found = [json.loads(f.read_text()) for f in sorted(src.glob("*-*.json"))]
            found = [r for r in found if isinstance(r, dict) and "perplexity" in r]
        elif src.suffix == ".md":
            found = _table_runs(src.read_text())
        else:
            found = json.loads(src.read_text())
        for r in found:
            ppl = r["perplexity"].get(eval_set)
            if r.get("family") != "fp" and ppl is not None and math.isfinite(ppl):
                runs.setdefault(r["name"], r)
    return list(runs.values())


def _table_runs(text: str) -> list[dict]:
    """The per-run rows of a bench ``results.md`` (the table whose header starts ``| run |``)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| run |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    runs = []
    for ln in lines[start + 2 :]:
        row = dict(zip(head, (c.strip() for c in ln.strip("|").split("|"))))
        if row.get("bits") in ("", None) or not row.get("storage bits"):
            continue  # FP, or a run not made
        sets = {k[4:]: float(v) for k, v in row.items() if k.startswith("ppl ") and v}
        runs.append(
            {
                "name": row["run"],
                "label": row["method"],
                "storage_bits": float(row["storage bits"]),
                "perplexity": sets,
            }
        )
    return runs


def frontier(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats: lower perplexity at equal or fewer bits (sorted by bits)."""
    best, out = math.inf, []
    for bits, ppl, name in sorted(points):
        if ppl < best:
            best = ppl
            out.append((bits, ppl, name))
    return out


# marker by grid dimension, hollow with row/column groups, dashed in act order (names as
# baq bench writes them: gptq-ic-g128-act-3b)
DIM_MARKERS = {"oc": "o", "ic": "s", "auto": "^"}
ZOOMS = ((2.95, 3.45), (3.95, 4.75))  # storage bits around the recommended 3.1 and 4.1
PEER_COLORS = ("#bcbd22", "#17becf", "#1f77b4", "#ff7f0e", "#2ca02c")


def variant(name: str) -> tuple[str, str, bool, bool]:
    """``(family, dim, grouped, act_order)`` from a run name (``baq-model-auto-g128-act-3b``)."""
    parts = name.split("-")
    dim = next((d for d in ("ic", "auto") if d in parts), "oc")
    grouped = any(p.startswith("g") and p[1:].isdigit() for p in parts)
    tags = {"ic", "auto", "block", "act", "clip", "s6"}
    family = "-".join(
        p for p in parts[:-1] if p not in tags and not (p.startswith("g") and p[1:].isdigit())
    )
    if not parts[-1].endswith("b"):  # a transcribed run: baq-model-4b-s6
        family = "-".join(p for p in parts if p not in tags and not p.endswith("b"))
    return family, dim, grouped, "act" in parts


def draw(runs: list[dict], eval_set: str, low: float, high: float) -> Figure:
    """The whole range (left) and the two ranges where the recommended settings lie (right)."""
    fig = Figure(figsize=(13, 6.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(1.5, 1))
    axes = [fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])]
    by_label: dict[str, list[tuple[float, float]]] = {}
    style: dict[str, tuple[str, str, bool, bool]] = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append((r["storage_bits"], r["perplexity"][eval_set]))
        family, *rest = variant(r["name"])
        # clipped ranges change a run more than any grid variant: a colour of their own
        family += " clip" if "clip" in r["name"].split("-") else ""
        style.setdefault(r["label"], (family, *rest))
    families = sorted({f for f, *_ in style.values()})
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    front = frontier([(r["storage_bits"], r["perplexity"][eval_set], r["name"]) for r in runs])
    for k, ax in enumerate(axes):
        for label, pts in sorted(by_label.items()):
            family, dim, grouped, act = style[label]
            xs, ys = zip(*sorted(pts))
            color = colors[family]
            ax.plot(
                xs,
                ys,
                marker=DIM_MARKERS[dim],
                color=color,
                linestyle=("--" if act else ":") if k == 0 else "none",
                markerfacecolor="none" if grouped else color,
                markersize=6,
                label=label,
            )
        for (label, pts), color in zip(PEERS.items(), PEER_COLORS):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="x", linestyle="-.", color=color, alpha=0.6, label=label)
        if front:
            xs, ys, _ = zip(*front)
            ax.plot(xs, ys, color="black", linewidth=2, alpha=0.3, label="baq frontier")
        ax.axhline(FP_PERPLEXITY, color="black", linestyle="--", label=f"FP ({FP_PERPLEXITY})")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if k == 0:
            ax.set_xlim(low, high)
            ax.set_ylim(FP_PERPLEXITY * 0.9, 1e5)  # 2-bit RTN and GPTQ (1e6) would squash the rest
            ax.set_xlabel("bits per weight of the decoder linears (storage; peers: see legend)")
            ax.set_ylabel(f"perplexity ({eval_set})")
            ax.legend(fontsize="xx-small", ncol=2)
            continue
        lo_x, hi_x = ZOOMS[k - 1]
        inside = [(b, p, n) for b, p, n in front if lo_x <= b <= hi_x]
        ax.set_xlim(lo_x, hi_x)
        if inside:
            best = min(p for _, p, _ in inside)
            ax.set_ylim(min(FP_PERPLEXITY, best) * 0.95, max(p for _, p, _ in inside) * 1.6)
        # labels stacked down the right side, each with a line to its point
        for i, (b, p, n) in enumerate(sorted(inside, key=lambda t: -t[1])):
            ax.annotate(
                f"{n} ({p:.2f} at {b:.3f})",
                (b, p),
                fontsize="xx-small",
                xytext=(0.98, 0.95 - 0.09 * i),
                textcoords="axes fraction",
                ha="right",
                arrowprops={"arrowstyle": "-", "alpha": 0.3, "linewidth": 0.6},
            )
        ax.set_title(f"{lo_x} to {hi_x} bits, the frontier's runs named", fontsize="small")
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "sources", type=Path, nargs="+", help="bench folders, results.md tables, JSON run lists"
    )
    p.add_argument("--set", default="wikitext2-test", help="evaluation set (peers: WikiText-2)")
    p.add_argument("--bits", type=float, nargs=2, default=(1.95, 5.7), help="x range")
    p.add_argument("--out", type=Path, help="write frontier.png here")
    args = p.parse_args()
    runs = load_runs(args.sources, args.set)
    print(f"{len(runs)} runs on {args.set}; the frontier (no run lower at fewer bits):")
    pts = [(r["storage_bits"], r["perplexity"][args.set], r["name"]) for r in runs]
    for bits, ppl, name in frontier(pts):
        print(f"  {bits:.3f} bits  {ppl:10.3f}  {name}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        fig = draw(runs, args.set, *args.bits)
        FigureCanvasAgg(fig)
        fig.savefig(args.out / "frontier.png", dpi=120)
        print(f"wrote {args.out / 'frontier.png'}")


if __name__ == "__main__":
    main()

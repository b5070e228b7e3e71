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


def draw(runs: list[dict], eval_set: str, low: float, high: float) -> Figure:
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    by_label: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append((r["storage_bits"], r["perplexity"][eval_set]))
    for label, pts in sorted(by_label.items()):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", linestyle=":", label=label)
    for label, pts in PEERS.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="x", linestyle="--", alpha=0.6, label=label)
    front = frontier([(r["storage_bits"], r["perplexity"][eval_set], r["name"]) for r in runs])
    if front:
        xs, ys, _ = zip(*front)
        ax.plot(xs, ys, color="black", linewidth=2, alpha=0.4, label="baq frontier")
    ax.axhline(FP_PERPLEXITY, color="black", linestyle="--", label=f"FP ({FP_PERPLEXITY})")
    ax.set_xlim(low, high)
    ax.set_yscale("log")
    ax.set_ylim(FP_PERPLEXITY * 0.9, 1e5)  # 2-bit RTN and GPTQ (1e6) would squash the rest
    ax.set_xlabel("bits per weight of the decoder linears (storage; peers: see legend)")
    ax.set_ylabel(f"perplexity ({eval_set})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small")
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

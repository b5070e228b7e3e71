"""The grid variants of ``baq bench`` runs side by side: one markdown row per run.

    python benchmarks/variants.py SOURCE [SOURCE ...] [--only PATTERN ...]

SOURCE is a bench folder (its cached run JSONs) or a JSON list of transcribed runs (as
:mod:`frontier` reads them). A row gives the run's grid (dimension, groups, act order, clipping),
its nominal and storage bits, perplexity and mean KL divergence (with its standard error) on each
evaluation set, and how many layers took per-IC grids; sorted by method, then nominal bits.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
from pathlib import Path

from frontier import load_runs, variant

SETS = ("wikitext2-test", "ptb-test")


def grid_of(run: dict) -> str:
    """``oc``, ``ic g128``, ``auto act clip``... from the run's config (or its name)."""
    quant = run.get("settings", {}).get("quant")
    if quant is None:
        _, dim, grouped, act = variant(run["name"])
        return " ".join([dim, *(["g?"] if grouped else []), *(["act"] if act else [])])
    words = [quant.get("dim", "oc")]
    if quant.get("adadim", "proxy") != "proxy":
        words.append(quant["adadim"])
    if quant.get("group_size"):
        words.append(f"g{quant['group_size']}")
    if quant.get("act_order"):
        words.append("act")
    if quant.get("clip"):
        words.append("clip")
    return " ".join(words)


def ic_layers(run: dict) -> str:
    layers = run.get("layers") or []
    if not layers or "dim" not in layers[0]:
        return ""
    return f"{sum(r['dim'] == 'ic' for r in layers)}/{len(layers)}"


def number(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.3g}" if x >= 1000 else f"{x:.2f}"


def kl_cell(run: dict, name: str) -> str:
    kl = (run.get("kl") or {}).get(name)
    if not kl:
        return ""
    err = kl.get("kl_mean_stderr")
    return f"{kl['kl_mean']:.3f}" + (f" ± {err:.3f}" if err is not None else "")


def table(runs: list[dict]) -> str:
    head = ["run", "grid", "nominal bits", "storage bits"]
    head += [f"ppl {s}" for s in SETS] + [f"KL {s}" for s in SETS] + ["IC layers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = lambda r: (variant(r["name"])[0], r.get("nominal_bits") or 0, r["name"])  # noqa: E731
    for r in sorted(runs, key=key):
        ppl = r["perplexity"]
        cells = [r["name"], grid_of(r), number(r.get("nominal_bits")), f"{r['storage_bits']:.3f}"]
        cells += [number(ppl.get(s)) for s in SETS] + [kl_cell(r, s) for s in SETS]
        cells.append(ic_layers(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sources", type=Path, nargs="+", help="bench folders or JSON run lists")
    p.add_argument("--only", nargs="+", help="fnmatch patterns of run names")
    args = p.parse_args()
    runs = load_runs(args.sources, SETS[0])
    if args.only:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r["name"], p) for p in args.only)]
    print(table(runs))


if __name__ == "__main__":
    main()

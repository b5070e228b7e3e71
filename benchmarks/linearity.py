"""The model-level loss model's linearity check over every run of one or more bench folders.

    python benchmarks/linearity.py MEASUREMENT SOURCE [SOURCE ...] [--set NAME] [--out DIR]

DESIGN.md section 1 ("Model-level allocation") models the increase of the model's loss as
``sum_l beta_l loss_l``: each layer's proxy loss priced by its importance. This prices every
GPTQ/BAQ run's measured layer losses (the ``layers`` rows of its cached JSON) by the Fisher
``beta`` of MEASUREMENT (a ``baq measure`` file) and sets the prediction against what the run
measured: the mean KL divergence to the float model and the log-perplexity increase
``ln(PPL_Q / PPL_FP)``. Prints one row per run and the Pearson correlation of the logs of each
pair; ``--out`` draws ``linearity.png`` (plots.plot_linearity) and ``kl.png``, the KL against
storage bits of every run with a KL, RTN included (plots.plot_kl). A SOURCE is a bench folder;
RTN runs have no layer losses (no Hessian) and are left out of the check.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from frontier import FP_PERPLEXITY, load_runs
from matplotlib.backends.backend_agg import FigureCanvasAgg

from baq.bench import plots
from baq.run.measure import Measurement


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("measurement", type=Path)
    p.add_argument("sources", type=Path, nargs="+")
    p.add_argument("--set", default="wikitext2-test", help="evaluation set")
    p.add_argument("--fp", type=float, default=FP_PERPLEXITY, help="the float model's perplexity")
    p.add_argument("--out", type=Path, help="write linearity.png here")
    args = p.parse_args()
    beta = Measurement.load(args.measurement).beta.get("fisher")
    if beta is None:
        raise SystemExit(f"{args.measurement}: no Fisher beta; measure with --importance fisher")
    rows, kept = [], []
    runs = load_runs(args.sources, args.set)
    for run in runs:
        predicted = plots.predicted_kl(run, beta)
        kl = ((run.get("kl") or {}).get(args.set) or {}).get("kl_mean")
        if predicted is None or kl is None:
            continue
        rows.append((run["name"], run["storage_bits"], predicted, kl, run["perplexity"][args.set]))
        kept.append(run)
    rows.sort(key=lambda r: r[2])
    print("| run | storage bits | predicted sum beta loss | measured KL | ratio | ln(PPL/FP) |")
    print("|---|---|---|---|---|---|")
    for name, bits, pred, kl, ppl in rows:
        print(
            f"| {name} | {bits:.3f} | {pred:.4g} | {kl:.4g} | {kl / pred:.2f} "
            f"| {math.log(ppl / args.fp):.3f} |"
        )
    if len(rows) < 2:
        raise SystemExit("fewer than two GPTQ/BAQ runs with layer losses and KL")
    logs = [(r[2], r[3]) for r in rows]
    print(f"{len(rows)} runs; Pearson of (log predicted, log KL) {plots.log_correlation(logs):.3f}")
    increase = [(r[2], math.log(r[4] / args.fp)) for r in rows if r[4] > args.fp]
    if len(increase) >= 2:
        r = plots.log_correlation(increase)
        print(f"Pearson of (log predicted, log ln(PPL/FP)) {r:.3f} over {len(increase)} runs")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, fig in {
            "linearity.png": plots.plot_linearity(kept, beta),
            "kl.png": plots.plot_kl([r for r in runs if r.get("kl")]),
        }.items():
            FigureCanvasAgg(fig)
            fig.savefig(args.out / name, dpi=120)
            print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()

"""What a measurement says: the layer importances of both estimators and the plans they give.

    python benchmarks/importance.py MEASUREMENT.safetensors [--bits 2 2.5 3 4] [--out DIR]

Prints, for a file written by ``baq measure --importance fisher noise``: the Spearman rank
correlation of the two estimators' ``beta_l`` over the layers, and the Pearson correlation of their
logs; the spread of ``beta`` (decades between the most and least important layer); per module kind
(``q_proj``, ..., ``down_proj``) the geometric-mean ``beta`` of each estimator and the mean planned
bits at each budget; and the planned bits of the first, middle and last blocks. ``--out`` also draws
``beta.png`` (plots.plot_beta).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg

from baq.bench import plots
from baq.config import QuantConfig
from baq.run.allocation import plan_bits, plan_levels
from baq.run.measure import Measurement


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("measurement", type=Path)
    p.add_argument("--bits", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0])
    p.add_argument("--out", type=Path, help="write beta.png here")
    args = p.parse_args()
    meas = Measurement.load(args.measurement)
    names = meas.names
    ests = list(meas.beta)
    for est in ests:
        b = [meas.beta[est][n] for n in names]
        print(f"{est}: beta spans {math.log10(max(b) / min(b)):.2f} decades over {len(b)} layers")
    if len(ests) >= 2:
        a, b = (meas.beta[e] for e in ests[:2])
        xa, xb = [a[n] for n in names], [b[n] for n in names]
        print(
            f"{ests[0]} vs {ests[1]}: Spearman {plots.rank_correlation(xa, xb):.3f}, "
            f"Pearson of logs {plots.log_correlation(list(zip(xa, xb))):.3f}"
        )
    kinds: dict[str, list[str]] = defaultdict(list)
    for n in names:
        kinds[n.rsplit(".", 1)[-1]].append(n)
    plans = {
        (est, B): {
            q.name: q.bits
            for q in plan_levels(meas, QuantConfig(bits=B, allocation="model", importance=est))
        }
        for est in ests
        for B in args.bits
    }
    head = ["kind", *(f"beta {e}" for e in ests)]
    head += [f"bits@{B:g} {e}" for e in ests for B in args.bits]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for kind, members in kinds.items():
        row = [kind]
        for est in ests:
            logs = [math.log(meas.beta[est][n]) for n in members]
            row.append(f"{math.exp(sum(logs) / len(logs)):.2e}")
        for est in ests:
            for B in args.bits:
                bits = [plans[(est, B)][n] for n in members]
                row.append(f"{sum(bits) / len(bits):.2f}")
        print("| " + " | ".join(row) + " |")
    blocks = sorted({int(n.split(".")[2]) for n in names if n.split(".")[2].isdigit()})
    for est in ests:
        for B in args.bits:
            cfg = QuantConfig(bits=B, allocation="model", importance=est)
            chosen = plan_levels(meas, cfg)
            per_block = defaultdict(list)
            for q in chosen:
                per_block[int(q.name.split(".")[2])].append(q.bits)
            shown = [blocks[0], blocks[len(blocks) // 2], blocks[-1]]
            cells = ", ".join(
                f"block {i} {sum(per_block[i]) / len(per_block[i]):.2f}" for i in shown
            )
            zero = sum(1 for q in chosen if q.bits == 0)
            print(
                f"{est} {B:g} bits ({plan_bits(chosen):.4f} nominal): {cells}; "
                f"{zero} layers at 0 bits"
            )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        fig = plots.plot_beta(meas.beta)
        FigureCanvasAgg(fig)
        fig.savefig(args.out / "beta.png", dpi=120)
        print(f"wrote {args.out / 'beta.png'}")


if __name__ == "__main__":
    main()

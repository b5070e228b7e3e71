"""Where a model-level run's predicted loss lies: shares of ``sum_l beta_l loss_l`` per kind of
linear and per block, and the layers with the largest shares.

    python benchmarks/loss_shares.py BENCH_RUN.json [--top N]

The equal-loss closed form (DESIGN.md section 1) gives every column the same marginal loss per
bit, so at the optimum a layer's share of the modelled loss follows its share of the weights:
a share far above that would mean a layer the allocation could not help (its level cap, or a
loss model that misprices it), and a cheap fix (leave it in float, give it more bits). The
run's own ``beta`` and measured GPTQ losses are used (the ``layers`` rows of a ``baq bench``
run of the model-level allocation).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def mean_bits(row: dict) -> float:
    """Mean ``log2 L_j`` of a layer's columns, from its level histogram."""
    hist = {int(k): int(n) for k, n in row["level_histogram"].items()}
    return sum(n * math.log2(k) for k, n in hist.items()) / sum(hist.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    rows = [r for r in json.loads(args.run.read_text())["layers"] if r.get("beta") is not None]
    if not rows:
        raise SystemExit(f"{args.run}: no layer carries beta; use a model-level run")
    price = {r["name"]: r["beta"] * r["loss"] for r in rows}
    weights = {r["name"]: r["shape"][0] * r["shape"][1] for r in rows}
    total, total_w = sum(price.values()), sum(weights.values())
    print(f"{len(rows)} layers; predicted sum beta loss {total:.4g}")
    for title, key in (
        ("kind", lambda n: n.rsplit(".", 1)[-1]),
        ("block", lambda n: next((int(p) for p in n.split(".") if p.isdigit()), -1)),
    ):
        share, wshare = defaultdict(float), defaultdict(float)
        for n in price:
            share[key(n)] += price[n] / total
            wshare[key(n)] += weights[n] / total_w
        print(f"\n| {title} | share of predicted loss | share of weights |\n|---|---|---|")
        for k in sorted(share, key=lambda k: (isinstance(k, int), k)):
            print(f"| {k} | {share[k]:.3f} | {wshare[k]:.3f} |")
    print("\n| layer | share of predicted loss | share of weights | mean bits |\n|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -price[r["name"]])[: args.top]:
        n = r["name"]
        print(f"| {n} | {price[n] / total:.4f} | {weights[n] / total_w:.4f} | {mean_bits(r):.2f} |")


if __name__ == "__main__":
    main()

"""Time of one layer solve as the column count grows, against the ``c * cols^3`` line (issue 28).

For each column count, one random layer of ``--rows`` rows and a Hessian with correlated inputs
of uneven scale (built in O(cols^2 k), not as a cols^3 product, so that 28672 columns stay
affordable) in float32 and float64, timed once each (after a small warm-up):

- factor: ``baq.quant.gptq.factor_hessian`` (dampen, Cholesky, inverse, Cholesky: the cols^3);
- gptq: ``gptq_solve`` at ``--bits`` on that factor (rows * cols^2);
- baq: BAQ's analytic step on the same factor (``column_sensitivity``, the allocation, the
  solve with the allocated levels), as ``quantize_layer`` runs it.

``c`` is fitted on the largest column count of each dtype (factor + gptq); the table gives each
measured time over ``c * cols^3``. Prints a Markdown table and writes JSON.

    nice python benchmarks/solve_scaling.py --cols 1024 2048 4096 8192 14336 --out solve.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from baq.config import QuantConfig
from baq.quant import allocate
from baq.quant.gptq import factor_hessian, gptq_solve
from baq.quant.grid import uniform_levels
from baq.quant.layer import column_sensitivity, layer_grid, solve_args


def random_hessian(cols: int, dtype: torch.dtype, k: int = 64, seed: int = 0) -> torch.Tensor:
    """``D (0.5 K + 0.5 Z Z^T / k) D``: K the AR(1) correlation 0.9^|i-j|, Z a (cols, k) normal
    factor, D log-normal scales; symmetric positive definite."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(cols, dtype=dtype)
    H = (idx[:, None] - idx[None, :]).abs_()
    H.mul_(math.log(0.9)).exp_().mul_(0.5)
    Z = torch.randn(cols, k, generator=g, dtype=dtype)
    H.addmm_(Z, Z.t(), alpha=0.5 / k)
    del Z
    d = torch.exp(torch.randn(cols, generator=g, dtype=dtype))
    H.mul_(d[:, None]).mul_(d[None, :])
    return H


def time_one(rows: int, cols: int, dtype: torch.dtype, cfg: QuantConfig) -> dict:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(rows, cols, generator=g) * 0.02
    H = random_hessian(cols, dtype)
    t = time.perf_counter()
    factor = factor_hessian(H, cfg.percdamp)
    t_factor = time.perf_counter() - t
    del H
    grid = layer_grid(W, None, cfg, "oc")
    t = time.perf_counter()
    gptq_solve(W, factor, uniform_levels(cols, int(cfg.bits), W.device), **solve_args(grid, cfg))
    t_gptq = time.perf_counter() - t
    t = time.perf_counter()
    sens, _ = column_sensitivity(W, factor, grid, cfg)
    levels = allocate.allocate_levels(sens, cfg.bits, cfg.exponent, cfg.max_levels)
    gptq_solve(W, factor, levels, **solve_args(grid, cfg))
    t_baq = time.perf_counter() - t
    return {"factor_s": t_factor, "gptq_s": t_gptq, "baq_s": t_baq}


def table(rows: list[dict]) -> str:
    out = [
        "| dtype | cols | factor s | GPTQ solve s | BAQ analytic s | factor+GPTQ s | "
        "c·cols³ s | measured / line |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = r["factor_s"] + r["gptq_s"]
        out.append(
            f"| {r['dtype']} | {r['cols']} | {r['factor_s']:.3f} | {r['gptq_s']:.3f} | "
            f"{r['baq_s']:.3f} | {total:.3f} | {r['line_s']:.3f} | {total / r['line_s']:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cols", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 14336])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--max-float64-cols", type=int, default=14336, help="skip larger in float64")
    p.add_argument("--bits", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cfg = QuantConfig(method="baq", bits=args.bits, sensitivity="analytic")
    time_one(args.rows, 256, torch.float32, cfg)  # warm-up
    rows: list[dict] = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for cols in sorted(args.cols):
            if dtype == torch.float64 and cols > args.max_float64_cols:
                continue
            r = {"dtype": name, "cols": cols, "rows": args.rows}
            r.update(time_one(args.rows, cols, dtype, cfg))
            print(json.dumps(r), flush=True)
            rows.append(r)
    for name in args.dtypes:
        mine = [r for r in rows if r["dtype"] == name]
        if not mine:
            continue
        big = max(mine, key=lambda r: r["cols"])
        c = (big["factor_s"] + big["gptq_s"]) / big["cols"] ** 3
        for r in mine:
            r["c"] = c
            r["line_s"] = c * r["cols"] ** 3
    print(f"rows {args.rows}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

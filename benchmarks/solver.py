"""Time the uniform GPTQ solve against the whole BAQ step on large random layers.

    python benchmarks/solver.py [--shapes 4096x4096 11008x4096] [--repeat 3] [--device cpu]

GPTQ here is what one layer costs inside `baq quantize --method gptq`: factorise H, one solve.
BAQ (measured) adds one uniform solve and the allocation on the same factorisation; BAQ
(analytic) replaces the uniform solve by the loss model. Reported: the median of ``--repeat``
runs after one warm-up, and the ratios to GPTQ measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from baq.config import QuantConfig
from baq.quant.layer import quantize_layer


def random_layer(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and a Hessian with correlated inputs of uneven scale (like LLM activations)."""
    g = torch.Generator().manual_seed(0)
    n = 2 * cols
    X = torch.randn(cols, n, generator=g) * torch.exp(torch.randn(cols, 1, generator=g))
    X += 0.3 * torch.randn(1, n, generator=g)
    H = 2 * X @ X.t() / n
    W = torch.randn(rows, cols, generator=g) * 0.02
    return W.to(device), H.to(device)


def timed(fn, repeat: int, device: torch.device) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    p.add_argument("--bits", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{'shape':>12} {'gptq s':>8} {'baq s':>8} {'baq/gptq':>9} {'analytic s':>11} {'ratio':>6}"
    )
    for shape in args.shapes:
        rows, cols = (int(x) for x in shape.split("x"))
        W, H = random_layer(rows, cols, device)
        configs = {
            "gptq": QuantConfig(method="gptq", bits=int(args.bits)),
            "baq": QuantConfig(allocation="layer", method="baq", bits=args.bits),
            "analytic": QuantConfig(
                allocation="layer", method="baq", bits=args.bits, sensitivity="analytic"
            ),
        }
        t = {
            k: timed(lambda c=c, W=W, H=H: quantize_layer(W, H, c), args.repeat, device)
            for k, c in configs.items()
        }
        print(
            f"{shape:>12} {t['gptq']:8.2f} {t['baq']:8.2f} {t['baq'] / t['gptq']:9.2f} "
            f"{t['analytic']:11.2f} {t['analytic'] / t['gptq']:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

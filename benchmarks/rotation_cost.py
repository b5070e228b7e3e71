"""Run-time cost of a rotated layer's input transform (issue 27 item 2), beside the layer's product.

For every shape (rows x cols = out x in) and token count, in one process, the best time of

* ``fp32``: ``F.linear(x, W)`` with a float32 weight (what ``--cache weight`` runs: a rotated
  layer's weight cache holds ``W' R`` and applies no transform);
* ``rotate``: ``PackedLinear.transform_input(x)``, the seeded randomized Hadamard transform ``R x``
  of :mod:`baq.quant.rotation` (fast Walsh-Hadamard butterflies, and a dense ``h x h`` product for
  widths ``h * 2^k``, e.g. 14336 = 28 x 512);
* ``codes``: ``PackedLinear(cache="codes")``'s forward of the same layer unrotated, and
  ``codes+rot`` rotated (transform included): what a loaded rotated model runs by default;

and the ratios ``rotate / fp32`` and ``codes+rot / codes``. The layers are 4-bit RTN of random
weights (the transform's cost does not depend on the codes).

    python benchmarks/rotation_cost.py --out rotation_cost.json
    python benchmarks/rotation_cost.py --threads 1 --repeat 100
    python benchmarks/rotation_cost.py --device cuda --repeat 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from baq.config import QuantConfig
from baq.quant.layer import quantize_layer
from baq.saved.packed_linear import PackedLinear

SHAPES = ["576x1536", "1536x576", "4096x4096", "4096x14336", "14336x4096"]


def timed(fn, x: torch.Tensor, repeat: int) -> float:
    """Fastest of ``repeat`` calls of ``fn(x)`` after three warm-up calls (the minimum: on a
    shared machine the median measures the neighbours)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        sync()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn(x)
            sync()
            times.append(time.perf_counter() - t)
    return min(times)


def layers(rows: int, cols: int, device: str) -> tuple[torch.Tensor, PackedLinear, PackedLinear]:
    """A random weight and its 4-bit RTN packed layers, unrotated and rotated, cache 'codes'."""
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    out = []
    for rotate in (False, True):
        res, _ = quantize_layer(W, None, QuantConfig(method="rtn", bits=4, rotate=rotate), "x")
        assert (res.rotation is not None) == rotate
        out.append(PackedLinear.from_quantized(res, cache="codes").to(device))
    return W.to(device), out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default torch's; 1 is steadier)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows_out = []
    print(f"device {args.device}, {torch.get_num_threads()} threads")
    head = "| shape | tokens | fp32 ms | rotate ms | rotate/fp32 | codes ms | codes+rot ms |"
    print(head + " ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        rows, cols = map(int, shape.split("x"))
        W, plain, rotated = layers(rows, cols, args.device)
        for n in args.tokens:
            x = torch.randn(n, cols, device=args.device)
            t = {
                "fp32": timed(lambda v, W=W: F.linear(v, W), x, args.repeat),
                "rotate": timed(rotated.transform_input, x, args.repeat),
                "codes": timed(plain, x, args.repeat),
                "codes+rot": timed(rotated, x, args.repeat),
            }
            row = {"shape": shape, "tokens": n, **{k: v * 1e3 for k, v in t.items()}}
            row["rotate/fp32"] = t["rotate"] / t["fp32"]
            row["codes+rot/codes"] = t["codes+rot"] / t["codes"]
            rows_out.append(row)
            print(
                f"| {shape} | {n} | {row['fp32']:.3f} | {row['rotate']:.3f} | "
                f"{row['rotate/fp32']:.2f} | {row['codes']:.3f} | {row['codes+rot']:.3f} | "
                f"{row['codes+rot/codes']:.2f} |",
                flush=True,
            )
    if args.out:
        meta = {"device": args.device, "threads": torch.get_num_threads(), "repeat": args.repeat}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()

"""What incoherence rotation does to BAQ's predicted gain and to GPTQ's loss (issue 27, item 2).

For every linear of the reference model (or of ``--blocks``), on its calibration Hessian
``H = 2 X X^T / n`` from the float model's walk (``BlockStep.hessians``), before and after the
input-side randomized Hadamard transform of :mod:`baq.quant.rotation` (``W' = W R^T``,
``H' = R H R^T``, a seed per layer from :func:`~baq.quant.rotation.layer_seed`):

- BAQ's predicted gain ``geomean(c) / mean(c)`` from the analytic sensitivities
  ``c_j = sum_r range_r^2 / (12 U_jj^2)`` on the per-OC min/max grid (``baq.quant.layer``);
- the proxy loss ``tr((W - Q) H (W - Q)^T)`` of GPTQ at ``--bits`` (uniform) and of BAQ at the
  same nominal bits with the per-layer closed form (analytic sensitivities), each relative to
  ``tr(W H W^T)``. The proxy loss is the same number in either basis (``R`` orthogonal).

Prints a Markdown table (per layer and geometric means per module kind) and writes JSON.

    nice python benchmarks/rotation_gain.py --out /tmp/rotation_gain.json   # ~8 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from baq import data
from baq.config import QuantConfig
from baq.model import blocks, loader
from baq.quant import allocate
from baq.quant import rotation as rot
from baq.quant.gptq import factor_hessian, proxy_loss
from baq.quant.grid import fit_grid
from baq.quant.layer import column_sensitivity, quantize_layer
from baq.run.walker import BlockWalk


def predicted_gain(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> float:
    """``geomean(c) / mean(c)`` of the analytic sensitivities, on the layer's per-OC grid."""
    factor = factor_hessian(H, cfg.percdamp)
    Wd = W.float().clone()
    Wd[:, factor.dead] = 0
    grid = fit_grid(Wd, cfg.group_size, cfg.sym, cfg.range_dtype, "oc")
    sens, _ = column_sensitivity(Wd, factor, grid, cfg)
    return allocate.predicted_gain(sens)


def relative_loss(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> float:
    """Proxy loss of ``cfg`` on the layer, relative to ``tr(W H W^T)``."""
    res, _ = quantize_layer(W, H, cfg)
    return proxy_loss(W, res.weight, H) / proxy_loss(W, torch.zeros_like(W), H)


def measure(W: torch.Tensor, H: torch.Tensor, bits: int, gain_only: bool) -> dict[str, float]:
    gptq = QuantConfig(method="gptq", bits=bits)
    baq = QuantConfig(method="baq", bits=bits, allocation="layer", sensitivity="analytic")
    if gain_only:
        return {"gain": predicted_gain(W, H, baq)}
    return {
        "gain": predicted_gain(W, H, baq),
        "gptq": relative_loss(W, H, gptq),
        "baq": relative_loss(W, H, baq),
    }


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--blocks", type=int, nargs="*", help="block indices (default: all)")
    p.add_argument("--seed", type=int, default=0, help="rotation seed of the run")
    p.add_argument("--gain-only", action="store_true", help="no GPTQ/BAQ solves: gains only")
    p.add_argument("--out", type=Path, default=Path("/tmp/rotation_gain.json"))
    args = p.parse_args()

    t0 = time.time()
    model, tok = loader.load_model(None, dtype="float32", device="cpu")
    tokens = data.tokenize(tok, data.load_text("builtin"))
    calib = data.calibration_windows(tokens, args.nsamples, args.seqlen, seed=0)
    rows: list[dict] = []
    walk = BlockWalk(model, calib, torch.device("cpu"), "measure", progress=False)
    with walk:
        last = max(args.blocks) if args.blocks else len(walk) - 1
        for step in walk:
            if args.blocks and step.index not in args.blocks:
                continue  # the walk runs the block forward for the next one
            hessians = step.hessians(torch.float32, keep_outputs=True)
            for name, mod in step.targets.items():
                full = f"{step.prefix}{name}"
                W = blocks.get_weight(mod).float()
                # float64 Hessians: the rotation's two products and the solves then lose nothing
                H = hessians.pop(name).double()
                r = rot.HadamardRotation(W.shape[1], rot.layer_seed(args.seed, full))
                Wr, Hr = rot.rotate_input(W.double(), H, r)
                row = {"name": full, "shape": list(W.shape)}
                plain, rotated = (measure(w, h, args.bits, args.gain_only) for w, h in
                                  ((W, H), (Wr.float(), Hr)))  # fmt: skip
                row |= {f"{k}_plain": v for k, v in plain.items()}
                row |= {f"{k}_rot": v for k, v in rotated.items()}
                if args.gain_only:
                    row |= {f"{m}_{b}": math.nan for m in ("gptq", "baq") for b in ("plain", "rot")}
                rows.append(row)
                print(
                    f"{full}: gain {row['gain_plain']:.3f} -> {row['gain_rot']:.3f}, "
                    f"gptq {row['gptq_plain']:.3e} -> {row['gptq_rot']:.3e}, "
                    f"baq {row['baq_plain']:.3e} -> {row['baq_rot']:.3e} "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
            if step.index >= last:
                break
    seconds = time.time() - t0
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}))
    print(table(rows, args))
    print(f"{len(rows)} layers in {seconds:.0f} s; JSON in {args.out}")


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """Per module kind: geometric means over its layers; then every layer."""
    head = (
        f"| layer | gain plain | gain rotated | GPTQ {args.bits}b plain | GPTQ rotated "
        f"| BAQ {args.bits}b plain | BAQ rotated |\n|---|---|---|---|---|---|---|\n"
    )
    keys = ("gain_plain", "gain_rot", "gptq_plain", "gptq_rot", "baq_plain", "baq_rot")

    def line(label: str, vals: list[float]) -> str:
        return "| " + label + " | " + " | ".join(f"{v:.3g}" for v in vals) + " |\n"

    kinds: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        kinds[r["name"].rsplit(".", 1)[-1]].append(r)
    out = "Geometric means per module kind (losses relative to tr(W H W^T))\n\n" + head
    for kind, members in kinds.items():
        out += line(f"{kind} ({len(members)})", [geomean([m[k] for m in members]) for k in keys])
    out += line(f"all ({len(rows)})", [geomean([m[k] for m in rows]) for k in keys])
    out += "\nEvery layer\n\n" + head
    for r in rows:
        out += line(r["name"], [r[k] for k in keys])
    return out


if __name__ == "__main__":
    main()

"""Saved models: file size, storage vs nominal bits, load memory, generation speed (issue 5).

For the reference model quantized with GPTQ and BAQ at 2, 3 and 4 bits, saved with
``baq.saved.storage``: bytes on disk, storage bits per quantized weight against the nominal rate,
peak
RSS of loading the folder in a fresh process, and greedy generation tokens per second of the packed
model with each weight cache of ``baq.saved.storage.load_quantized`` (``none``: dequantizing in
every
forward; ``codes``: integer offsets, one byte per weight; ``weight``: the dequantized weights)
against the float model, each in a fresh process, as ratios to the float model of the same run.

The storage rate depends on the level counts only, and speed and memory not at all on the
calibration, so this uses fewer calibration windows than the perplexity protocol (``--nsamples``,
default 16) to stay quick; the perplexity of these models is not what it measures.

    python benchmarks/storage.py --out /tmp/storage-bench      # ~15 min on two CPU cores

``--forward`` times instead the ``cache="codes"`` forward of one packed layer per grid dimension
(per-OC, per-IC by whole column, per-IC in groups of 128 rows) on the reference model's linear
shapes, all in this one process with the same random level counts, against the float layer:

    OMP_NUM_THREADS=1 python benchmarks/storage.py --forward       # ~1 min, no model needed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The history of the city begins"
CACHES = ("none", "codes", "weight")  # baq.config.WEIGHT_CACHES, without importing baq here


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (VmHWM where readable: reset by exec)."""
    from baq.run.report import peak_rss_gib

    return peak_rss_gib() * 1024


def measure_child(folder: str, packed: bool, cache: str, new_tokens: int, repeats: int) -> dict:
    """Runs in a fresh process: load, then time greedy generation; peak RSS of the whole."""
    import torch

    from baq.saved import storage

    torch.manual_seed(0)
    rss0 = peak_rss_mib()
    t = time.perf_counter()
    if packed:
        model, tok = storage.load_quantized(folder, cache=cache)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
    load_s = time.perf_counter() - t
    rss_load = peak_rss_mib()
    ids = tok(PROMPT, return_tensors="pt")
    best = float("inf")
    with torch.inference_mode():
        # the calibration-time config turns the KV cache off; generation wants it
        model.generation_config.use_cache = True
        model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up (fills the cache)
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(
                **ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            best = min(best, time.perf_counter() - t)
    n = out.shape[1] - ids["input_ids"].shape[1]
    return {
        "load_seconds": load_s,
        "rss_before_load_mib": rss0,
        "peak_rss_load_mib": rss_load,
        "peak_rss_mib": peak_rss_mib(),
        "tokens_per_second": n / best,
    }


def child(folder: Path, packed: bool, cache: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--child", str(folder), "--new-tokens", str(args.new_tokens),
        "--repeats", str(args.repeats), *(["--packed"] if packed else []),
        "--cache", cache,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def save_float(model, folder: Path) -> None:
    """The float model as a plain safetensors folder (a GGUF-loaded model refuses to save)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(folder)


# (rows, cols) of SmolLM2-135M's linears: q/o, k/v, gate/up, down
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
FORWARD_GRIDS = (("oc", None), ("ic", None), ("ic", 128))


def forward_speeds(tokens: tuple[int, ...] = (1, 512), repeats: int = 20) -> list[dict]:
    """Best-of-``repeats`` seconds of the codes forward per grid, shape and token count.

    The same weights and level counts (random, 2 to 16 levels a column, like BAQ at 3 bits) for
    every grid, so only the grid's layout differs.
    """
    import torch
    import torch.nn.functional as F

    from baq.quant.gptq import rtn_solve
    from baq.saved.packed_linear import PackedLinear

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    g = torch.Generator().manual_seed(0)
    rows_out = []
    with torch.inference_mode():
        for rows, cols in SHAPES:
            W = torch.randn(rows, cols, generator=g) * 0.02
            levels = torch.randint(2, 17, (cols,), generator=g)
            layers = {}
            for dim, gs in FORWARD_GRIDS:
                res = rtn_solve(W, levels, gs, dim=dim)
                layers[f"{dim}" + (f"-g{gs}" if gs else "")] = PackedLinear.from_quantized(
                    res, cache="codes"
                )
            for n in tokens:
                x = torch.randn(n, cols, generator=g)
                row = {"shape": [rows, cols], "tokens": n}
                row["float"] = best(lambda x=x, W=W: F.linear(x, W))
                for name, layer in layers.items():
                    row[name] = best(lambda layer=layer, x=x: layer(x))
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    return rows_out


def format_forward(rows: list[dict]) -> str:
    names = [k for k in rows[0] if k not in ("shape", "tokens", "float")]
    lines = [
        "| shape (rows x cols) | tokens | float us | "
        + " | ".join(f"{n} us (x oc)" for n in names)
        + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = " | ".join(f"{r[n] * 1e6:.0f} ({r[n] / r['oc']:.2f})" for n in names)
        lines.append(
            f"| {r['shape'][0]} x {r['shape'][1]} | {r['tokens']} | {r['float'] * 1e6:.0f} | "
            f"{cells} |"
        )
    return "\n".join(lines)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("storage-bench"))
    p.add_argument("--methods", nargs="+", default=["gptq", "baq"])
    p.add_argument("--bits", nargs="+", type=float, default=[2, 3, 4])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child")
    p.add_argument("--packed", action="store_true")
    p.add_argument("--cache", choices=CACHES, default="none")
    p.add_argument("--forward", action="store_true", help="per-OC vs per-IC codes forward only")
    args = p.parse_args()
    if args.forward:
        print(format_forward(forward_speeds()))
        return
    if args.child:
        res = measure_child(args.child, args.packed, args.cache, args.new_tokens, args.repeats)
        print(json.dumps(res))
        return

    import torch

    from baq import data
    from baq.config import QuantConfig
    from baq.model import loader
    from baq.run.quantization import quantize_model
    from baq.saved import storage

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "storage.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else {}
    model, tok = loader.load_model(None, dtype="float32", device="cpu")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"
    source = str(text) if text.is_file() else "builtin"
    tokens = data.tokenize(tok, data.load_text(source, split="train"))
    start = 150_000 if tokens.numel() > 160_000 else 0
    calib = data.calibration_windows(tokens, args.nsamples, 512, 0, start)

    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        fp_dir = Path(tmp) / "float"
        save_float(model, fp_dir)
        tok.save_pretrained(fp_dir)
        if "float" not in rows:
            rows["float"] = {"bytes": folder_bytes(fp_dir), **child(fp_dir, False, "none", args)}
            results_path.write_text(json.dumps(rows, indent=1))
        for method in args.methods:
            for bits in args.bits:
                name = f"{method}-{bits:g}b"
                if name in rows:
                    continue
                cfg = QuantConfig(allocation="layer", method=method, bits=bits)
                model.load_state_dict(original)
                t = time.perf_counter()
                run = quantize_model(model, calib, cfg, device="cpu")
                seconds = time.perf_counter() - t
                folder = Path(tmp) / name
                storage.save_quantized(folder, model, tok, run.results, cfg)
                rows[name] = {
                    "nominal_bits": run.nominal_bits,
                    "storage_bits": storage.storage_bits(folder),
                    "bytes": folder_bytes(folder),
                    "quantized_bytes": (folder / "quantized.safetensors").stat().st_size,
                    "quantize_seconds": seconds,
                    **{cache: child(folder, True, cache, args) for cache in CACHES},
                }
                results_path.write_text(json.dumps(rows, indent=1))
                print(name, json.dumps(rows[name]), flush=True)
    print(format_table(rows))
    (args.out / "storage.md").write_text(format_table(rows) + "\n")
    del torch


def format_table(rows: dict) -> str:
    fp = rows["float"]
    base = fp["tokens_per_second"]
    lines = [
        "| model | nominal bits | storage bits | folder MiB | peak RSS MiB (none / codes / "
        "weight) | tokens/s none (x float) | codes (x float) | weight (x float) |",
        "|---|---|---|---|---|---|---|---|",
        f"| float32 | 32 | 32 | {fp['bytes'] / 2**20:.1f} | {fp['peak_rss_mib']:.0f} | "
        f"{base:.1f} (1.00) | | |",
    ]
    for name, r in rows.items():
        if name == "float":
            continue
        rss = " / ".join(f"{r[c]['peak_rss_mib']:.0f}" for c in CACHES)
        speeds = " | ".join(
            f"{r[c]['tokens_per_second']:.1f} ({r[c]['tokens_per_second'] / base:.2f})"
            for c in CACHES
        )
        lines.append(
            f"| {name} | {r['nominal_bits']:.3f} | {r['storage_bits']:.3f} | "
            f"{r['bytes'] / 2**20:.1f} | {rss} | {speeds} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

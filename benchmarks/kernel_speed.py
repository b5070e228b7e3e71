"""Per-layer speed of the fused CPU kernel (issue 26) against float matmuls and the codes path.

For every shape (rows x cols = out x in), nominal bits and token count: the median time of

* ``fp32``: ``F.linear`` with a float32 weight; ``bf16``: with a bfloat16 weight and input;
* ``codes``: today's ``PackedLinear(cache="codes")`` (an int8 per weight, baq/saved);
* ``numba``: ``baq.kernels.cpu.linear`` on the numba kernel's layout (session 12; float32
  ranges, as PackedLinear keeps them), with ``--numba`` only: once numba's thread pool exists, the
  threads of every later product in the process wait on it on a loaded machine (measured: 576x1536
  float32 ``F.linear`` 125 us before, 20 ms after), so it is best measured in a process of its own;
* ``native``: ``baq.kernels.native.linear`` on the row-lane layout (the C++ kernel's default
  layout since session 21, baq/kernels/row_lanes.py); ``lanes``: on the column-lane layout
  (``cache="lanes"``, the default of sessions 13-20);
* ``module``: ``PackedLinear(cache="kernel")``, the kernel this machine runs through the module's
  forward;

with the effective bandwidth of each (the bytes its weight takes, read once per product, over the
time), the CPU time of each (``time.process_time``: all threads, so on a shared machine a measure
of the work that waiting for a core does not inflate) and, measured in the same process, a STREAM-
like copy bandwidth (two 512 MiB float32 arrays: read + write bytes over the time) and a read-only
one (a sum over one of them): the physical limit
a memory-bound product approaches. The layers' level counts are sampled from the level histograms
of real BAQ runs on the reference model (docs/results: model-level allocation, 2, 3 and 4 bits;
every column weighted by its rows), or synthesized (``--synthetic``: ``L = round(2^(B + 0.5 *
log2(c / geomean c)))``, ``log c ~ N(0, 2^2)``, clamped to [1, 256]). ``--llama LOG`` adds
llama.cpp's times for the same (m, n, k) from ``test-backend-ops perf -o MUL_MAT`` output.

    python benchmarks/kernel_speed.py --out kernel_speed.json
    python benchmarks/kernel_speed.py --shapes 4096x14336 --bits 3 --tokens 1 --repeat 50
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from baq.kernels import native
from baq.kernels.lanes import build_lanes
from baq.kernels.layout import build_layout
from baq.kernels.row_lanes import build_row_lanes
from baq.quant.grid import fit_grid
from baq.saved.packed_linear import PackedLinear
from baq.saved.packing import layer_nbytes, pack_columns

ROOT = Path(__file__).resolve().parents[1]
HISTOGRAMS = {
    2: "docs/results/bench-s10/baq-measured-2b-b7e996d7b80e.json",
    3: "docs/results/bench-s10/baq-model-3b-71542a699ca0.json",
    4: "docs/results/bench-s10/baq-measured-4b-7775430e724c.json",
}
SHAPES = ["576x1536", "1536x576", "4096x4096", "4096x14336", "14336x4096"]


def real_histogram(bits: int) -> Counter:
    """Level count -> weights, over every layer of a real reference-model run at ``bits``."""
    data = json.loads((ROOT / HISTOGRAMS[bits]).read_text())
    out: Counter = Counter()
    for layer in data["layers"]:
        for L, n in layer["level_histogram"].items():
            out[int(L)] += n * layer["shape"][0]
    return out


def sample_levels(cols: int, bits: int, synthetic: bool, gen: torch.Generator) -> torch.Tensor:
    if synthetic:
        logc = torch.randn(cols, generator=gen, dtype=torch.float64) * 2.0
        b = bits + 0.5 * (logc - logc.mean()) / math.log(2)
        return torch.round(2.0**b).clamp(1, 256).long()
    hist = real_histogram(bits)
    values = torch.tensor(sorted(hist))
    weights = torch.tensor([hist[int(v)] for v in values], dtype=torch.float64)
    return values[torch.multinomial(weights, cols, replacement=True, generator=gen)]


def timeit(fn, repeat: int, budget_s: float = 3.0) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` after two warm-up calls, at most ``repeat`` runs
    or the budget."""
    fn()
    fn()
    times: list[float] = []
    cpu_times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat and (time.perf_counter() - start < budget_s or len(times) < 5):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    return statistics.median(times), statistics.median(cpu_times)


def stream_bandwidth(mib: int = 512) -> dict[str, float]:
    """Copy (read + write bytes) and read-only (sum) bandwidth in GB/s, best of five."""
    n = mib * 2**20 // 4
    a = torch.ones(n)
    b = torch.empty(n)
    copy = min(_once(lambda: b.copy_(a)) for _ in range(5))
    read = min(_once(lambda: a.sum()) for _ in range(5))
    return {"copy_gbs": 2 * a.nbytes / copy / 1e9, "read_gbs": a.nbytes / read / 1e9}


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def llama_times(paths: list[str]) -> dict[tuple[str, int, int, int], float]:
    """(type, m, n, k) -> seconds per product from test-backend-ops perf logs."""
    out = {}
    pattern = re.compile(
        r"MUL_MAT\(type_a=(\w+),type_b=f32,m=(\d+),n=(\d+),k=(\d+),bs=\[1,1\],nr=\[1,1\],"
        r"per=\[0,1,2,3\],k_v=0,o=1.*?([\d.]+) us/run"
    )
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            m = pattern.search(line)
            if m:
                key = (m[1], int(m[2]), int(m[3]), int(m[4]))
                out.setdefault(key, float(m[5]) * 1e-6)
    return out


def bench_layer(rows, cols, bits, tokens_list, args, gen) -> list[dict]:
    levels = sample_levels(cols, bits, args.synthetic, gen)
    W = torch.randn(rows, cols, generator=gen)
    grid = fit_grid(W, group_size=args.group_size, sym=False)
    codes = (torch.rand(rows, cols, generator=gen) * levels).long()
    packed = pack_columns(codes, levels)
    layer = PackedLinear(packed, grid.lo, grid.hi, grid.group_size, False, cache="codes")
    layout = build_layout(codes, levels, grid.group_size, False) if args.numba else None
    lanes = build_lanes(codes, levels, grid.group_size, False)
    rowl = build_row_lanes(codes, levels, grid.group_size, False)
    lo16, hi16 = grid.lo.half(), grid.hi.half()
    lo32, hi32 = lo16.float(), hi16.float()  # the float16 ranges of a save, as the module keeps
    klayer = PackedLinear(packed, lo16, hi16, grid.group_size, False, cache="kernel")
    saved = layer_nbytes(rows, grid.lo.shape[1], levels)
    ceiling = sum(rows * ((int(L) - 1).bit_length()) for L in levels.tolist()) // 8
    Wf = layer.dequantize()
    Wb = Wf.bfloat16()
    del W, codes
    nominal = float(torch.log2(levels.double()).mean())
    results = []
    for T in tokens_list:
        x = torch.randn(T, cols, generator=gen)
        xb = x.bfloat16()
        with torch.inference_mode():
            layer(x)  # builds the codes cache outside the timing
            klayer(x)  # and the module's layout
            fns = {
                "fp32": lambda x=x: F.linear(x, Wf),
                "bf16": lambda xb=xb: F.linear(xb, Wb),
                "codes": lambda x=x: layer(x),
                "numba": lambda x=x: _numba_linear(layout, x, lo32, hi32),
                "native": lambda x=x: native.linear(rowl, x, lo32, hi32),
                "lanes": lambda x=x: native.linear(lanes, x, lo32, hi32),
                "module": lambda x=x: klayer(x),
            }
            if layout is None:
                del fns["numba"]
            both = {k: timeit(fn, args.repeat) for k, fn in fns.items()}
            t = {k: v[0] for k, v in both.items()}
            cpu_t = {k: v[1] for k, v in both.items()}
        row = {
            "shape": [rows, cols],
            "bits": bits,
            "nominal_bits": nominal,
            "tokens": T,
            "seconds": t,
            "cpu_seconds": cpu_t,
            "bytes": {
                "fp32": Wf.nbytes,
                "bf16": Wb.nbytes,
                "codes": layer._offsets.nbytes(),
                "native": rowl.nbytes() + 2 * lo16.nbytes,
                "lanes": lanes.nbytes() + 2 * lo16.nbytes,
                "module": klayer.resident_nbytes(),
                "saved": saved,
            },
            "layout_over_saved": (rowl.nbytes() + 2 * lo16.nbytes) / saved,
            "lanes_over_saved": (lanes.nbytes() + 2 * lo16.nbytes) / saved,
            "ceiling_codes_over_saved": (ceiling + 2 * lo16.nbytes) / saved,
        }
        if layout is not None:
            row["bytes"]["numba"] = layout.nbytes() + 2 * lo16.nbytes
            row["numba_layout_over_saved"] = row["bytes"]["numba"] / saved
        row["gbs"] = {k: row["bytes"][k] / v / 1e9 for k, v in t.items()}
        results.append(row)
        print(_line(row, args.llama), flush=True)
    return results


def _numba_linear(layout, x, lo, hi):
    from baq.kernels import cpu  # numba: imported only when asked for (see the docstring)

    return cpu.linear(layout, x, lo, hi)


def _line(row, llama) -> str:
    t, gbs, c = row["seconds"], row["gbs"], row["cpu_seconds"]
    rows, cols = row["shape"]
    cells = [
        f"{rows}x{cols}",
        str(row["bits"]),
        str(row["tokens"]),
        *(f"{t[k] * 1e6:.0f}" if k in t else "-" for k in
          ("fp32", "bf16", "codes", "numba", "native", "lanes", "module")),
        f"{t['fp32'] / t['native']:.2f}",
        f"{c['fp32'] / c['native']:.2f}",
        f"{t['codes'] / t['module']:.2f}",
        f"{gbs['native']:.1f}",
        f"{row['layout_over_saved']:.3f}",
    ]  # fmt: skip
    for typ in ("q2_K", "q3_K", "q4_K", "q4_0"):
        s = llama.get((typ, rows, row["tokens"], cols))
        cells.append(f"{s * 1e6:.0f}" if s else "-")
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| layer (out x in) | bits | tokens | fp32 us | bf16 us | codes us | numba us | native us | "
    "lanes us | module us | fp32 / native | same, CPU time | codes / module | native GB/s | "
    "layout / saved | llama Q2_K us | Q3_K us | Q4_K us | Q4_0 us |\n|" + "---|" * 19
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--synthetic", action="store_true", help="synthetic level histogram")
    ap.add_argument("--numba", action="store_true", help="time the numba kernel too")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama", nargs="*", default=[], help="test-backend-ops perf logs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.llama = llama_times(args.llama)
    gen = torch.Generator().manual_seed(0)
    bandwidth = stream_bandwidth()
    print(
        f"threads {torch.get_num_threads()}; STREAM-like copy {bandwidth['copy_gbs']:.1f} GB/s, "
        f"read {bandwidth['read_gbs']:.1f} GB/s\n\n{HEADER}",
        flush=True,
    )
    results = []
    for shape in args.shapes:
        rows, cols = map(int, shape.split("x"))
        for bits in args.bits:
            results += bench_layer(rows, cols, bits, args.tokens, args, gen)
    bandwidth_after = stream_bandwidth()
    print(f"\nSTREAM-like copy after: {bandwidth_after['copy_gbs']:.1f} GB/s")
    if args.out:
        payload = {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "bandwidth": bandwidth,
            "bandwidth_after": bandwidth_after,
            "synthetic_levels": args.synthetic,
            "group_size": args.group_size,
            "results": results,
        }
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()

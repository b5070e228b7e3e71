"""End-to-end runtime of a saved model per cache mode (issue 26): generation speed, prompt time,
peak memory and the bytes of the quantized linears, one fresh process per mode.

For a saved folder (``baq quantize ... --output FOLDER``) and each mode of ``kernel``,
``compact``, ``codes``, ``weight`` (``baq.load(FOLDER, cache=MODE)``) and ``float``
(``--float-model``, default the
reference model, loaded by ``baq.load_model`` in the dtype of the saved dense tensors), a
subprocess measures

* ``tok_s``: greedy generation of ``--new-tokens`` tokens (batch 1, KV cache on) after a
  ``--gen-prompt``-token prompt, new tokens over the wall time of ``generate`` (median of
  ``--repeat``);
* ``prompt_s``: one forward of a ``--prompt-tokens``-token prompt (batch 1, median);
* ``linear_bytes``: bytes the quantized linears hold after those forwards
  (``PackedLinear.resident_nbytes``: buffers plus the cache; for ``float`` the same linears'
  float weights) and ``storage_bytes`` (their saved bytes);
* ``rss_load_mib`` after loading and ``peak_rss_mib`` (``VmHWM``: the whole process, torch and
  the tokenizer included) at the end.

The tokens come from ``--text`` (WikiText-2 test), so every mode sees the same input. A first
short forward and generation before the timings builds each mode's cache (and, for ``kernel``,
loads the native kernel: compiled at the first use on a machine, cached on disk).

    python benchmarks/runtime_e2e.py /tmp/ref3 --out /tmp/e2e.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("kernel", "lanes", "compact", "codes", "weight", "float")
FORWARDED = ("new_tokens", "gen_prompt", "prompt_tokens", "repeat", "threads", "text")
FORWARDED += ("float_model",)
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def rss_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> dict:
    import torch

    import baq
    from baq.saved.loading import packed_layers_meta
    from baq.saved.packed_linear import PackedLinear

    torch.set_num_threads(args.threads or torch.get_num_threads())
    folder = Path(args.folder)
    layers = packed_layers_meta(folder)
    t0 = time.perf_counter()
    if args.mode == "float":
        config = json.loads((folder / "config.json").read_text())
        dense_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        model, tok = baq.load_model(args.float_model, dtype=dense_dtype)
    else:
        model, tok = baq.load(folder, cache=args.mode)
    load_s = time.perf_counter() - t0
    model.config.use_cache = True
    rss_load = rss_mib("VmRSS")
    ids = tok(args.text_value, return_tensors="pt").input_ids
    need = args.prompt_tokens
    if ids.shape[1] < need:
        raise SystemExit(f"--text gives {ids.shape[1]} tokens, {need} needed")
    prompt = ids[:, : args.prompt_tokens]
    gen_prompt = ids[:, : args.gen_prompt]
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0

    def generate():
        return model.generate(
            gen_prompt,
            attention_mask=torch.ones_like(gen_prompt),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )

    with torch.inference_mode():
        model(gen_prompt)  # builds the caches (layouts, offsets, weights)
        first = generate()
        gen_times, prompt_times = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = generate()
            gen_times.append(time.perf_counter() - t)
        for _ in range(args.repeat):
            t = time.perf_counter()
            model(prompt, use_cache=False)
            prompt_times.append(time.perf_counter() - t)
    assert torch.equal(out, first)
    modules = dict(model.named_modules())
    linear_bytes = storage_bytes = 0
    for name in layers:
        m = modules[name]
        if isinstance(m, PackedLinear):
            linear_bytes += m.resident_nbytes()
            storage_bytes += m.storage_nbytes
        else:
            linear_bytes += m.weight.numel() * m.weight.element_size()
    gen_s = statistics.median(gen_times)
    return {
        "mode": args.mode,
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "load_s": load_s,
        "tok_s": args.new_tokens / gen_s,
        "gen_s": gen_s,
        "prompt_s": statistics.median(prompt_times),
        "linear_bytes": linear_bytes,
        "storage_bytes": storage_bytes,
        "rss_load_mib": rss_load,
        "peak_rss_mib": rss_mib("VmHWM"),
        "tokens": out[0, gen_prompt.shape[1] :].tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gen-prompt", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--float-model", default=None, help="the float model (default: reference)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.mode:
        args.text_value = args.text.read_text()[:200_000]
        print(json.dumps(child(args)))
        return
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, args.folder, "--mode", mode]
        for flag in FORWARDED:
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-3000:])
            raise SystemExit(f"{mode}: exit {done.returncode}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(_line(rows[-1]), flush=True)
    ref = next((r["tokens"] for r in rows if r["mode"] == "weight"), None)
    for r in rows:
        r["same_tokens_as_weight"] = None if ref is None else r["tokens"] == ref
    print("\n" + HEADER)
    for r in rows:
        print(_line(r))
    if args.out:
        args.out.write_text(json.dumps({"folder": args.folder, "rows": rows}, indent=1))


HEADER = (
    "| mode | dtype | tokens/s (64 new) | 512-token prompt s | quantized linears MiB | "
    "peak RSS MiB | RSS after load MiB | same tokens as weight |\n|" + "---|" * 8
)


def _line(r: dict) -> str:
    same = r.get("same_tokens_as_weight")
    return (
        f"| {r['mode']} | {r['dtype']} | {r['tok_s']:.1f} | {r['prompt_s']:.3f} | "
        f"{r['linear_bytes'] / 2**20:.1f} | {r['peak_rss_mib']:.0f} | {r['rss_load_mib']:.0f} | "
        f"{'-' if same is None else same} |"
    )


if __name__ == "__main__":
    main()

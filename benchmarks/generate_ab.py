"""Interleaved generation speed of one saved model under several caches (issue 26).

benchmarks/runtime_e2e.py measures each cache in a process of its own, one after the other, and
this machine's speed drifts by up to 20 % between such windows (session 20), more than the
differences between the kernel layouts. Here one process loads the folder once per cache (and
the float model with ``--float``), then every round generates ``--new-tokens`` greedy tokens
(batch 1, KV cache on) with each model in turn, so all of them see the same load; it prints the
median tokens a second of each and the median over rounds of each one's time against the
first cache's in the same round.

    python benchmarks/generate_ab.py FOLDER --caches kernel lanes codes --float --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2-test.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--caches", nargs="+", default=["kernel", "lanes", "codes"])
    ap.add_argument("--float", action="store_true", help="the float model too")
    ap.add_argument("--float-model", default=None, help="the float model (default: reference)")
    ap.add_argument(
        "--float-dtype", default="auto", help="the float model's dtype (default: its file's)"
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--text", type=Path, default=TEXT)
    args = ap.parse_args()
    import baq

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for cache in args.caches:  # a cache named twice is loaded twice: the noise between them
        name = cache if cache not in models else f"{cache} (again)"
        models[name], tok = baq.load(args.folder, cache=cache)
    if args.float:
        # float_model None: the reference model
        models["float"] = baq.load_model(args.float_model, dtype=args.float_dtype)[0]
    ids = tok(args.text.read_text()[:20000], return_tensors="pt").input_ids[:, : args.prompt_tokens]
    seconds: dict[str, list[float]] = {k: [] for k in models}
    outputs = {}
    with torch.inference_mode():
        for name, model in models.items():  # builds the caches, loads the kernel
            outputs[name] = model.generate(ids, max_new_tokens=8, do_sample=False)
        for _ in range(args.rounds):
            for name, model in models.items():
                t = time.perf_counter()
                out = model.generate(
                    ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False,
                )  # fmt: skip
                seconds[name].append(time.perf_counter() - t)
                outputs[name] = out
    first = args.caches[0]
    print(f"| model | tokens/s ({args.new_tokens} new, median of {args.rounds}) | "
          f"time / {first}'s, median of rounds | same tokens as {first} |")  # fmt: skip
    print("|---|---:|---:|---|")
    for name, secs in seconds.items():
        ratio = statistics.median(s / f for s, f in zip(secs, seconds[first], strict=True))
        same = torch.equal(outputs[name], outputs[first])
        tps = args.new_tokens / statistics.median(secs)
        print(f"| {name} | {tps:.1f} | {ratio:.3f} | {same} |")


if __name__ == "__main__":
    main()

"""What the compact base-logits record costs in KL: exact KL against the merged-tail KL of the
top-k base record, on one window, for several k.

    python benchmarks/kl_topk.py SAVED_FOLDER [--text ../shared/data/wikitext2-test.txt]
        [--windows 1] [--k 32 64 128 256 512 1024 4096]

The base is the reference model (the float model the saved folder was quantized from); both
models score the same first ``--windows`` 2048-token windows of ``--text``.
"""

from __future__ import annotations

import argparse

import torch

from baq import data
from baq.eval import divergence
from baq.model import loader
from baq.saved import storage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("saved")
    p.add_argument("--text", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--k", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 4096])
    args = p.parse_args()
    base, tok = loader.load_model(None, None, "float32", "cpu")
    quant, _ = storage.load_quantized(args.saved, device="cpu")
    tokens = data.tokenize(tok, data.load_text(args.text, split="test"))
    exact, compact = [], {k: [] for k in args.k}
    for w in data.eval_windows(tokens, 2048, args.windows):
        with torch.inference_mode():
            lb = base(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            lq = quant(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        t = w[1:]
        exact.append(divergence.exact_window(lb, lq, t)[0])
        for k in args.k:
            record = divergence.compact_window(lb, t, k)
            compact[k].append(divergence.compact_kl(record, lq, t)[0])
    e = float(torch.cat(exact).mean())
    print(f"exact mean KL {e:.5f} over {torch.cat(exact).numel()} positions")
    print("| k | compact KL | compact / exact |\n|---|---|---|")
    for k in args.k:
        c = float(torch.cat(compact[k]).mean())
        print(f"| {k} | {c:.5f} | {c / e:.3f} |")


if __name__ == "__main__":
    main()

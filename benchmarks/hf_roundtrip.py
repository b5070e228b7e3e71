"""A saved folder through transformers: from_pretrained vs baq.load, save_pretrained, pipeline.

    OMP_NUM_THREADS=1 python benchmarks/hf_roundtrip.py FOLDER [RESAVED]

Prints whether ``AutoModelForCausalLM.from_pretrained(FOLDER)`` (after ``import baq``) gives
``baq.load``'s logits bit for bit on the first 2048-token window of WikiText-2
(``../shared/data/wikitext2-test.txt``), whether ``save_pretrained`` writes the same
``quantized.safetensors`` and both loaders read it back to the same logits, and a greedy
``pipeline("text-generation")`` continuation. docs/RESULTS.md has a run on the reference model.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, pipeline

import baq
from baq import data

TEXT = "../shared/data/wikitext2-test.txt"


def main(folder: str, resaved: str) -> None:
    ref, tok = baq.load(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    tokens = data.tokenize(tok, data.load_text(TEXT, split="test"))
    x = data.eval_windows(tokens, 2048, 1)
    with torch.no_grad():
        a, b = hf(x).logits, ref(x).logits
    diff = (a - b).abs().max().item()
    print(f"from_pretrained vs baq.load, 1 x 2048: bit-exact {torch.equal(a, b)}, max|diff| {diff}")
    hf.save_pretrained(resaved)
    name = "quantized.safetensors"
    same = (Path(folder) / name).read_bytes() == (Path(resaved) / name).read_bytes()
    again, _ = baq.load(resaved)
    hf2 = AutoModelForCausalLM.from_pretrained(resaved)
    with torch.no_grad():
        c, d = again(x).logits, hf2(x).logits
    print(
        f"save_pretrained: {name} identical {same}; read back bit-exact by baq.load "
        f"{torch.equal(c, b)}, by from_pretrained {torch.equal(d, b)}"
    )
    pipe = pipeline("text-generation", model=folder, tokenizer=folder)
    out = pipe("The capital of France is", max_new_tokens=12, do_sample=False)
    print("pipeline:", repr(out[0]["generated_text"]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else f"{sys.argv[1]}-resaved")

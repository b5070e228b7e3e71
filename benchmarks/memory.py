"""Peak host memory of walking a model block by block: lazy loading against a full load.

    python benchmarks/memory.py [--blocks 4 16] [--hidden 1024] [--intermediate 2816]
                                [--vocab 32000] [--batch 8] [--seqlen 128] [--threads 1]
                                [--quantize]

Two synthetic Llama models of the same width and different depths (random weights, float32,
saved as sharded safetensors in a temporary folder) are walked the way the quantization
pipeline walks them: block 0's inputs are captured for a (batch, seqlen) window of token ids,
then every block runs forward on the whole batch. ``lazy`` opens the folder with
``baq.model.lazy.open_lazy`` and loads and releases each block around its forward; ``full`` loads
the
whole model with ``from_pretrained``, as ``baq.model.loader.load_model`` does. ``baseline`` only
imports the libraries. Each measurement runs in a fresh subprocess and reports its peak
resident set size (``baq.run.report.peak_rss_gib``: ``VmHWM`` on Linux). With lazy loading the peak
should not grow with depth: the 16-block / 4-block ratio should be near 1 for ``lazy`` and near
the ratio of the model sizes for ``full``.

``--quantize`` measures the whole command instead: ``baq quantize FOLDER --method gptq --bits 4
--nsamples BATCH --seqlen SEQLEN --eval none --output OUT``, with ``--lazy`` (``quantize-lazy``)
and without (``quantize-full``), each in a fresh process; the folders get a word-level tokenizer
and the calibration text is Python's ``pydoc_data.topics``. Besides the walk this holds the solver
results (a full load keeps float weights and int32 codes of every layer, ``--lazy`` uint8 codes
only) and writes the packed save.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("baseline", "lazy", "full")
QUANTIZE_MODES = ("baseline", "quantize-lazy", "quantize-full")


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (VmHWM where readable: reset by exec)."""
    from baq.run.report import peak_rss_gib

    return peak_rss_gib() * 1024


def make_model(folder: Path, blocks: int, args: argparse.Namespace) -> int:
    """Save a random Llama with ``blocks`` blocks to ``folder``; return its size on disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=max(2048, args.seqlen),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, max_shard_size="200MB")
    if args.quantize:
        make_tokenizer(args.vocab).save_pretrained(folder)
        (folder.parent / "corpus.txt").write_text(corpus())
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def corpus() -> str:
    """Python's own documentation text: a calibration text that needs no download."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def make_tokenizer(vocab: int):
    """A word-level tokenizer over the most common words of :func:`corpus` (ids < ``vocab``)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word, _ in Counter(corpus().split()).most_common(vocab - len(ids)):
        ids[word] = len(ids)
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def measure_quantize(mode: str, folder: str, args: argparse.Namespace) -> dict:
    """One ``baq quantize`` run (in a fresh process), lazy or not; report its peak RSS."""
    import shutil

    import torch

    torch.set_num_threads(args.threads)
    from baq.cli import main

    out = Path(folder).parent / f"out-{Path(folder).name}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["quantize", folder, "--method", "gptq", "--bits", "4", "--device", "cpu", "-q"]
    argv += ["--calib", str(Path(folder).parent / "corpus.txt"), "--nsamples", str(args.batch)]
    argv += ["--seqlen", str(args.seqlen), "--eval", "none", "--output", str(out)]
    if mode == "quantize-lazy":
        argv.append("--lazy")
    t0 = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"baq {' '.join(argv)} failed")
    result = {"mode": mode, "seconds": time.perf_counter() - t0, "peak_mib": peak_rss_mib()}
    shutil.rmtree(out, ignore_errors=True)
    return result


def measure(mode: str, folder: str, args: argparse.Namespace) -> dict:
    """One measurement (run in a fresh process): walk every block, report peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    from baq.model import blocks, lazy

    if mode.startswith("quantize"):
        return measure_quantize(mode, folder, args)
    result = {"mode": mode}
    if mode == "baseline":
        result["peak_mib"] = peak_rss_mib()
        return result
    t0 = time.perf_counter()
    loader = None
    if mode == "lazy":
        model, _, loader = lazy.open_lazy(folder, tokenizer=False)
    else:  # what baq.model.loader.load_model does, minus the tokenizer (none is saved here)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
        model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen))
    with torch.inference_mode():
        captured, kwargs = blocks.capture_block_inputs(model, ids, "cpu")
        hidden = torch.cat(captured)
        del captured
        layers = blocks.decoder_layers(model)
        for i in range(len(layers)):
            block = loader.load_block(i) if loader else layers[i]
            hidden = blocks.run_block(block, hidden, kwargs)
            del block
            if loader:
                loader.release_block(i)
    result["seconds"] = time.perf_counter() - t0
    result["peak_mib"] = peak_rss_mib()
    result["finite"] = bool(torch.isfinite(hidden).all())
    return result


def run_child(flag: str, value: str, folder: Path, args: argparse.Namespace) -> dict:
    """Run this script with ``flag value folder`` in a fresh process; return its JSON line.

    The parent never imports torch nor holds a model, so where the peak falls back to
    ``ru_maxrss`` (which a child starts from its parent's resident set) it still measures the child.
    """
    cmd = [sys.executable, __file__, flag, value, str(folder)]
    for key in ("hidden", "intermediate", "vocab", "batch", "seqlen", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.quantize:
        cmd.append("--quantize")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{flag} {value} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--quantize",
        action="store_true",
        help="measure `baq quantize --lazy` against `baq quantize` (GPTQ 4 bits, --nsamples "
        "BATCH) instead of a bare block walk",
    )
    p.add_argument("--measure", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--make", nargs=2, metavar=("BLOCKS", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args)))
        return
    if args.make:
        size = make_model(Path(args.make[1]), int(args.make[0]), args)
        print(json.dumps({"bytes": size}))
        return

    modes = QUANTIZE_MODES if args.quantize else MODES
    lazy_mode, full_mode = modes[1], modes[2]
    print(
        f"Llama hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab} "
        f"(untied), float32; batch ({args.batch}, {args.seqlen}); {args.threads} thread(s); "
        "peak RSS in MiB, each in a fresh process"
        + ("; baq quantize --method gptq --bits 4 --eval none --output" if args.quantize else "")
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="baq-memory-") as tmp:
        for blocks in args.blocks:
            folder = Path(tmp) / f"llama-{blocks}"
            size = run_child("--make", str(blocks), folder, args)["bytes"] / 2**20
            res = {mode: run_child("--measure", mode, folder, args) for mode in modes}
            rows.append((blocks, size, res))
    base = rows[0][2]["baseline"]["peak_mib"]
    print(f"baseline (python + torch + transformers imported): {base:.0f} MiB")
    print(
        f"{'blocks':>6} {'model MiB':>10} {'lazy peak':>10} {'lazy-base':>10} {'lazy s':>7} "
        f"{'full peak':>10} {'full-base':>10} {'full s':>7}"
    )
    for blocks, size, res in rows:
        lazy, full = res[lazy_mode], res[full_mode]
        b = res["baseline"]["peak_mib"]
        print(
            f"{blocks:>6} {size:>10.0f} {lazy['peak_mib']:>10.0f} {lazy['peak_mib'] - b:>10.0f} "
            f"{lazy['seconds']:>7.1f} {full['peak_mib']:>10.0f} {full['peak_mib'] - b:>10.0f} "
            f"{full['seconds']:>7.1f}"
        )
    if len(rows) >= 2:
        (b0, s0, r0), (b1, s1, r1) = rows[0], rows[-1]
        for mode in (lazy_mode, full_mode):
            ratio = r1[mode]["peak_mib"] / r0[mode]["peak_mib"]
            above = (r1[mode]["peak_mib"] - r1["baseline"]["peak_mib"]) / (
                r0[mode]["peak_mib"] - r0["baseline"]["peak_mib"]
            )
            print(
                f"{mode}: peak {b1}/{b0} blocks = {ratio:.2f} (above baseline {above:.2f}); "
                f"model size ratio {s1 / s0:.2f}"
            )


if __name__ == "__main__":
    main()

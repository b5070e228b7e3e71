"""Llama-shaped checkpoints of real widths with random weights, for time and memory (issue 28).

Writes a folder that ``baq quantize --lazy`` reads like any ``save_pretrained`` output:
``config.json``, ``generation_config.json``, the reference model's tokenizer (SmolLM2, 49152
tokens, read from its GGUF), and sharded safetensors with ``model.safetensors.index.json``, named
as transformers names them (``model-00001-of-00004.safetensors``). The shards are written a block
at a time, so the generator holds one block (about 1.7 GB for the 70B shape in bfloat16) and
never the model: ``save_pretrained`` would need every block in memory.

Shapes (hidden, intermediate, heads, KV heads): ``7b`` is Llama 3 8B / Mistral 7B's
(4096, 14336, 32, 8), ``70b`` Llama 3 70B's (8192, 28672, 64, 8); the head is untied, as theirs.
Weights are N(0, 0.02) (transformers' Llama init), norms 1. Quality on them means nothing.

    nice python benchmarks/make_shapes.py 7b /tmp/llama-7b-shape --blocks 2     # ~1.7 GB
    nice python benchmarks/make_shapes.py 70b /tmp/llama-70b-shape --blocks 2   # ~5.0 GB
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

SHAPES = {
    "7b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8},
    "70b": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8},
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"


def make_config(shape: str, blocks: int, vocab: int, dtype: str, bos: int | None, eos: int | None):
    from transformers import LlamaConfig

    s = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=blocks,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        dtype=dtype,
    )


def block_shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor name (inside a block) -> shape, as ``LlamaDecoderLayer`` has them."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=g)


def shard_groups(config) -> list[list[tuple[str, tuple[int, ...]]]]:
    """One shard for the embedding, one per block, one for the final norm and the head."""
    h, v = config.hidden_size, config.vocab_size
    groups = [[("model.embed_tokens.weight", (v, h))]]
    for b in range(config.num_hidden_layers):
        groups.append([(f"model.layers.{b}.{n}", s) for n, s in block_shapes(config).items()])
    groups.append([("model.norm.weight", (h,)), ("lm_head.weight", (v, h))])
    return groups


def write_shards(config, out: Path, dtype: torch.dtype, seed: int) -> Iterator[tuple[str, int]]:
    """Write the shards one at a time; yields (file name, bytes) as each is done."""
    from safetensors.torch import save_file

    groups = shard_groups(config)
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            t: random_tensor(t, shape, dtype, seed * 1_000_003 + hash_name(t)) for t, shape in group
        }
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        total += size
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
        yield name, size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def hash_name(name: str) -> int:
    """A seed offset per tensor name that does not change between Python runs."""
    import zlib

    return zlib.crc32(name.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("output", type=Path, help="folder to write (must not exist)")
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks (default 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from baq.model import loader

    out = args.output.expanduser()
    out.mkdir(parents=True, exist_ok=False)
    tok = loader.load_tokenizer()  # the reference model's, from its GGUF
    config = make_config(
        args.shape, args.blocks, len(tok), args.dtype, tok.bos_token_id, tok.eos_token_id
    )
    config.save_pretrained(out)
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    t = time.perf_counter()
    total = 0
    for name, size in write_shards(config, out, DTYPES[args.dtype], args.seed):
        total += size
        print(f"{name}: {size / 2**30:.2f} GiB ({time.perf_counter() - t:.0f} s)", flush=True)
    params = total // DTYPES[args.dtype].itemsize
    print(f"wrote {out}: {args.shape} shape, {args.blocks} blocks, {params / 1e9:.2f} B parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What many tests build: the built-in corpus, a word-level tokenizer over it and tiny Llama
models, all made here with no download."""

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from baq.config import QuantConfig
from baq.model import blocks
from baq.quant.layer import quantize_layer

VOCAB = 512


def corpus(chars: int) -> str:
    """The first ``chars`` characters of the built-in corpus (Python's pydoc topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def make_tokenizer():
    """A word-level tokenizer over the most common words of the built-in corpus (no download)."""
    from collections import Counter
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(" ".join(topics[k] for k in sorted(topics)).split())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w, _ in words.most_common(VOCAB - len(vocab)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_tiny_llama(layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


ARCH_VOCAB = 100
HIDDEN = 32
LAYERS = 2

ROPE = dict(
    vocab_size=ARCH_VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
GATED_MLP = [
    ("self_attn.q_proj", (32, 32)),
    ("self_attn.k_proj", (16, 32)),
    ("self_attn.v_proj", (16, 32)),
    ("self_attn.o_proj", (32, 32)),
    ("mlp.gate_proj", (64, 32)),
    ("mlp.up_proj", (64, 32)),
    ("mlp.down_proj", (32, 64)),
]

# tiny models of each supported family: arch -> (config, model class, path of the blocks, path of
# the final norm, expected linears)
ARCHS = {
    "llama": (
        LlamaConfig(**ROPE),
        LlamaForCausalLM,
        "model.layers",
        "model.norm",
        GATED_MLP,
    ),
    "qwen2": (
        Qwen2Config(**ROPE),
        Qwen2ForCausalLM,
        "model.layers",
        "model.norm",
        GATED_MLP,
    ),
    "mistral": (
        MistralConfig(**ROPE),
        MistralForCausalLM,
        "model.layers",
        "model.norm",
        GATED_MLP,
    ),
    "gemma": (
        GemmaConfig(**ROPE, head_dim=8),
        GemmaForCausalLM,
        "model.layers",
        "model.norm",
        GATED_MLP,
    ),
    "phi": (
        PhiConfig(**ROPE),
        PhiForCausalLM,
        "model.layers",
        "model.final_layernorm",
        [
            ("self_attn.q_proj", (32, 32)),
            ("self_attn.k_proj", (16, 32)),
            ("self_attn.v_proj", (16, 32)),
            ("self_attn.dense", (32, 32)),
            ("mlp.fc1", (64, 32)),
            ("mlp.fc2", (32, 64)),
        ],
    ),
    "opt": (
        OPTConfig(
            vocab_size=ARCH_VOCAB,
            hidden_size=HIDDEN,
            ffn_dim=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=HIDDEN,
        ),
        OPTForCausalLM,
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        [
            ("self_attn.k_proj", (32, 32)),
            ("self_attn.v_proj", (32, 32)),
            ("self_attn.q_proj", (32, 32)),
            ("self_attn.out_proj", (32, 32)),
            ("fc1", (64, 32)),
            ("fc2", (32, 64)),
        ],
    ),
    "gpt2": (
        GPT2Config(
            vocab_size=ARCH_VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        GPT2LMHeadModel,
        "transformer.h",
        "transformer.ln_f",
        [
            ("attn.c_attn", (96, 32)),
            ("attn.c_proj", (32, 32)),
            ("mlp.c_fc", (128, 32)),
            ("mlp.c_proj", (32, 128)),
        ],
    ),
}
ARCH_IDS = list(ARCHS)


def tiny_model(arch: str) -> nn.Module:
    """A seeded 2-layer model of the given family with eager attention, in eval mode."""
    config, cls, *_ = ARCHS[arch]
    config = config.__class__.from_dict(config.to_dict())  # a fresh copy per test
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(config).eval()


def make_tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    cfg.bos_token_id = cfg.eos_token_id = 2
    return GPT2LMHeadModel(cfg).eval()


def quantize_all(model, cfg: QuantConfig, seed: int = 0) -> dict:
    """Quantize every decoder linear on a random Hessian ``2 X X^T / n`` and write it back."""
    g = torch.Generator().manual_seed(seed)
    layers = blocks.decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    results = {}
    for block in layers:
        for short, mod in blocks.linears(block).items():
            W = blocks.get_weight(mod)
            X = torch.randn(W.shape[1], 96, generator=g) * torch.rand(W.shape[1], 1, generator=g)
            res, _ = quantize_layer(W, 2 * X @ X.T / X.shape[1], cfg)
            blocks.set_weight(mod, res.weight)
            results[f"{names[id(block)]}.{short}"] = res
    return results


def ids(n=2, seq=12):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(3))


def rehash_manifest(folder, rel):
    """Record a changed file's size and hash in the manifest, as an attacker would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / rel).read_bytes()
    manifest["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def quantize_argv(setup, out: Path | None, *extra: str) -> list[str]:
    """A quick GPTQ ``baq quantize`` command line on a test setup (folder, model, text)."""
    root, model_dir, text = setup
    return [
        "quantize", str(model_dir), "-q", "--method", "gptq", "--bits", "3", "--calib",
        str(text), "--nsamples", "8", "--seqlen", "32", "--eval", "none", "--device", "cpu",
        *(["--output", str(out)] if out is not None else []), *extra,
    ]  # fmt: skip


# the environment the test session started with: in-process CLI runs change it (a quiet run sets
# TQDM_DISABLE), and a child process measured for memory must not inherit what earlier tests left
START_ENV = dict(os.environ)

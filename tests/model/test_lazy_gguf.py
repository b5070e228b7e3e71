"""``--lazy`` on a GGUF file: each block dequantized from the file when reached, with the values,
names and dtypes of transformers' whole GGUF load (issue 28)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from baq.cli import main
from baq.model import lazy
from baq.model import loader as models
from helpers import VOCAB, corpus, folder_bytes, make_tiny_llama, quantize_argv

LAYERS = 3


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A GGUF byte-level BPE vocabulary of ``VOCAB`` tokens: the 256 byte symbols, merges of
    lowercase letter pairs, and an end-of-text control token last."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    letters = "etaoinshrdlucmfwyp"
    pairs = [a + b for a in letters for b in letters][: VOCAB - len(tokens) - 1]
    merges = [f"{p[0]} {p[1]}" for p in pairs]
    return [*tokens, *pairs, "<|endoftext|>"], merges


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q and k (transformers undoes it when loading)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_gguf(model, path: Path, qtype: str) -> Path:
    """``model`` (a tiny Llama, tied head) as a llama.cpp-style GGUF with a byte-level tokenizer;
    matrices in ``qtype`` (F32, Q8_0, Q4_0), norms in F32."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    tokens, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    kind = gguf.GGMLQuantizationType[qtype]

    def add(name: str, t: torch.Tensor) -> None:
        data = t.detach().float().numpy()
        if data.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    add("token_embd.weight", model.model.embed_tokens.weight)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        for name, t in layer.state_dict().items():
            base = name.removesuffix(".weight")
            data = t
            if base == "self_attn.q_proj":
                data = torch.from_numpy(llama_permute(t.numpy(), heads))
            elif base == "self_attn.k_proj":
                data = torch.from_numpy(llama_permute(t.numpy(), kv))
            add(f"blk.{i}.{GGUF_NAMES[base]}.weight", data)
    add("output_norm.weight", model.model.norm.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_llama(layers=LAYERS)
    with torch.no_grad():  # norms away from 1, so that a missed or extra transform shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand(p.shape) * 0.5)
    return model


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(tiny, root / f"tiny-{q}.gguf", q) for q in ("F32", "Q8_0", "Q4_0")}


def _on_meta(block):
    return all(p.device.type == "meta" for p in block.parameters())


def test_can_load_gguf_lazily(ggufs, tmp_path):
    path = ggufs["F32"]
    assert lazy.can_load_lazily(str(path))
    assert lazy.can_load_lazily(str(path.parent), gguf_file=path.name)
    assert not lazy.can_load_lazily(str(path.parent), gguf_file="absent.gguf")
    assert not lazy.can_load_lazily(str(tmp_path / "absent.gguf"))
    assert not lazy.can_load_lazily("some-org/some-model", gguf_file="model.gguf")


@pytest.mark.parametrize(
    "qtype, dtype", [("F32", "auto"), ("Q8_0", "auto"), ("Q4_0", "auto"), ("Q8_0", "bfloat16")]
)
def test_blocks_match_whole_gguf_load(qtype, dtype, ggufs, tiny):
    path = str(ggufs[qtype])
    full, full_tok = models.load_model(path, dtype=dtype)
    model, tok, loader = lazy.open_lazy(path, dtype)
    assert tok("the cat").input_ids == full_tok("the cat").input_ids
    assert model.config.to_dict()["vocab_size"] == VOCAB
    assert model.dtype == full.dtype and len(loader) == LAYERS
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like the full load
    assert all(_on_meta(block) for block in loader.blocks)
    want = dict(full.named_parameters(remove_duplicate=False))
    source = dict(tiny.named_parameters(remove_duplicate=False))
    for i in range(len(loader)):
        loader.load_block(i)
        real = {n: p for n, p in model.named_parameters(remove_duplicate=False)
                if p.device.type != "meta"}  # fmt: skip
        assert len(real) == 3 + 9  # embedding and its tied head, final norm, one block
        for name, p in real.items():
            assert p.dtype == want[name].dtype and torch.equal(p, want[name]), name
            if qtype == "F32" and dtype == "auto":  # q/k rows back in transformers' order
                assert torch.equal(p, source[name]), name
        loader.release_block(i)
    assert all(_on_meta(block) for block in loader.blocks)
    buffers = dict(model.named_buffers())
    for name, buf in full.named_buffers():
        assert torch.equal(buffers[name], buf), name


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(corpus(60_000))
    return path


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "gguf-file"])
def test_quantize_lazily_saves_the_bytes_of_a_whole_load(as_folder, ggufs, text, tmp_path):
    path = ggufs["Q8_0"]
    model_arg = [str(path.parent), "--gguf-file", path.name] if as_folder else [str(path)]
    setup = (tmp_path, "MODEL", text)
    outs = {}
    for mode in ("whole", "lazy"):
        argv = quantize_argv(setup, tmp_path / mode, *(["--lazy"] if mode == "lazy" else []))
        i = argv.index("MODEL")
        argv[i : i + 1] = model_arg
        assert main(argv) == 0
        outs[mode] = folder_bytes(tmp_path / mode)
    assert outs["lazy"] == outs["whole"]
    assert any(name.endswith(".safetensors") for name in outs["lazy"])


def test_measure_lazily_matches_a_whole_load(ggufs, text, tmp_path):
    from baq.run import measure

    path = str(ggufs["Q4_0"])
    common = ["measure", path, "-q", "--calib", str(text), "--nsamples", "4", "--seqlen", "32"]
    common += ["--device", "cpu", "--importance", "fisher"]
    assert main([*common, "--output", str(tmp_path / "whole.safetensors")]) == 0
    assert main([*common, "--lazy", "--output", str(tmp_path / "lazy.safetensors")]) == 0
    whole = measure.Measurement.load(tmp_path / "whole.safetensors")
    streamed = measure.Measurement.load(tmp_path / "lazy.safetensors")
    assert streamed.settings == whole.settings and streamed.names == whole.names
    assert all(torch.equal(streamed.sens[n], whole.sens[n]) for n in whole.names)
    # the streamed Fisher pass sums its terms in another order (as for a safetensors folder)
    assert streamed.beta["fisher"] == pytest.approx(whole.beta["fisher"], rel=1e-5)

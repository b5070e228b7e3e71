"""Tests for baq.eval.scoring.perplexity against a slow position-by-position reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from baq.eval.scoring import perplexity

VOCAB = 50


class ConstantLogits(nn.Module):
    """A "language model" whose logits are the same value everywhere."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))  # also gives perplexity() a device

    def forward(self, input_ids, use_cache=None):
        return SimpleNamespace(logits=self.value.expand(*input_ids.shape, VOCAB))


def slow_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(total nll / number of predicted tokens), one log_softmax + gather per position."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].double()  # (seq, vocab)
            for t in range(window.numel() - 1):
                logp = torch.log_softmax(logits[t], dim=-1)
                total -= logp.gather(0, window[t + 1 : t + 2]).item()
                count += 1
    return math.exp(total / count)


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_matches_slow_reference():
    model = tiny_llama()
    windows = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    ppl = perplexity(model, windows)
    assert ppl == pytest.approx(slow_perplexity(model, windows), rel=1e-5)
    assert perplexity(model, windows, device="cpu") == ppl


def test_uniform_logits_give_the_vocab_size():
    windows = torch.randint(0, VOCAB, (3, 8))
    assert perplexity(ConstantLogits(), windows) == pytest.approx(VOCAB, rel=1e-6)


def test_nan_logits_give_nan():
    windows = torch.randint(0, VOCAB, (2, 8))
    assert math.isnan(perplexity(ConstantLogits(float("nan")), windows))


@pytest.mark.parametrize("shape", [(8,), (2, 1), (0, 8)], ids=["1d", "seq1", "empty"])
def test_bad_windows(shape):
    with pytest.raises(ValueError, match="windows has shape"):
        perplexity(ConstantLogits(), torch.zeros(shape, dtype=torch.int64))

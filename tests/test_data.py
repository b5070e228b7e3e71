"""Tests for baq.data: text sources, tokenisation and token windows."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

from baq import data
from baq.data import CalibConfig

TOKENS = torch.arange(1000, dtype=torch.int64) * 7  # distinct values: position is recoverable


def tiny_tokenizer(model_max_length: int = 8) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over single letters, built offline."""
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", model_max_length=model_max_length
    )


def starts_of(windows: torch.Tensor) -> torch.Tensor:
    return windows[:, 0] // 7


def test_calibration_windows_shape_and_contiguity():
    windows = data.calibration_windows(TOKENS, nsamples=16, seqlen=32)
    assert windows.shape == (16, 32) and windows.dtype == torch.int64
    # every window is a contiguous slice of the stream
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.full((16, 31), 7))


def test_calibration_windows_follow_the_gptq_draw():
    windows = data.calibration_windows(TOKENS, nsamples=8, seqlen=32, seed=3, start=100)
    expected = torch.randint(100, 1000 - 32, (8,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(starts_of(windows), expected)


def test_calibration_windows_seeds():
    a = data.calibration_windows(TOKENS, 8, 32, seed=0)
    assert torch.equal(a, data.calibration_windows(TOKENS, 8, 32, seed=0))
    assert not torch.equal(a, data.calibration_windows(TOKENS, 8, 32, seed=1))


def test_calibration_windows_stay_inside_start_end():
    windows = data.calibration_windows(TOKENS, 200, 50, start=300, end=500)
    starts = starts_of(windows)
    assert starts.min() >= 300
    assert (starts + 50).max() <= 500


def test_calibration_windows_too_few_tokens_names_the_counts():
    with pytest.raises(ValueError, match=r"has 1000 tokens.* need at least 1025"):
        data.calibration_windows(TOKENS, 4, 1024)
    with pytest.raises(ValueError, match=r"has 1000 tokens.*before end=600 need at least 613"):
        data.calibration_windows(TOKENS, 4, 100, start=512, end=600)
    with pytest.raises(ValueError, match="end=2000 is past the end of the text"):
        data.calibration_windows(TOKENS, 4, 100, end=2000)


def test_eval_windows_non_overlapping_in_order():
    windows = data.eval_windows(TOKENS, 64)
    assert windows.shape == (15, 64)  # 1000 // 64, the partial tail dropped
    assert torch.equal(windows.flatten(), TOKENS[: 15 * 64])
    assert torch.equal(data.eval_windows(TOKENS, 64, nwindows=2), windows[:2])


def test_eval_windows_too_short():
    with pytest.raises(ValueError, match=r"has 1000 tokens; 20 windows of 64 need 1280"):
        data.eval_windows(TOKENS, 64, nwindows=20)
    with pytest.raises(ValueError, match=r"has 1000 tokens; 1 windows of 2048 need 2048"):
        data.eval_windows(TOKENS, 2048)


def test_builtin_text():
    text = data.load_text("builtin")
    assert len(text) > 100_000
    assert text == data.load_text("builtin")  # deterministic order


def test_txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert data.load_text(str(path)) == "héllo\nworld\n"


def test_jsonl_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert data.load_text(str(path)) == "first\n\nsecond"


def test_jsonl_without_text_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r'bad.jsonl:1 has no string "text" field'):
        data.load_text(str(path))


@pytest.mark.parametrize("content", [b"", b"  \n\n"], ids=["empty", "blank"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="empty.txt holds no text"):
        data.load_text(str(path))


@pytest.mark.parametrize("content", [b"text\x00more", b"caf\xe9 latin-1"], ids=["nul", "not-utf8"])
def test_binary_file(tmp_path, content):
    path = tmp_path / "blob.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"blob.txt is (binary|not UTF-8)"):
        data.load_text(str(path))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.txt does not exist"):
        data.load_text("/nowhere.txt")


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown text source 'wiki'.*builtin, wikitext2, ptb, c4"):
        data.load_text("wiki")


def test_hub_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match=r"needs the datasets package.*local \.txt file"):
        data.load_text("wikitext2")


def test_hub_source_bad_split():
    with pytest.raises(ValueError, match="split='dev'"):
        data.load_text("ptb", split="dev")


def test_tokenize_whole_text_without_length_warning(capfd):
    tokens = data.tokenize(tiny_tokenizer(model_max_length=4), "a b c d e f g h")
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_calib_config_defaults_and_errors():
    cfg = CalibConfig()
    assert (cfg.nsamples, cfg.seqlen, cfg.seed, cfg.start, cfg.end) == (128, 512, 0, 0, None)
    with pytest.raises(ValueError, match="nsamples=0"):
        CalibConfig(nsamples=0)
    with pytest.raises(ValueError, match="seqlen=1"):
        CalibConfig(seqlen=1)
    with pytest.raises(ValueError, match="start=-1"):
        CalibConfig(start=-1)
    with pytest.raises(ValueError, match="end=600 leaves no room"):
        CalibConfig(start=100, end=600, seqlen=512)
    with pytest.raises(ValueError, match="nsamples=True"):
        CalibConfig(nsamples=True)

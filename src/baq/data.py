"""Text sources -> token windows for calibration and evaluation.

A source is the built-in corpus (CPython's ``pydoc_data.topics``, no download), a local ``.txt``
or ``.jsonl`` file, or a hub dataset (``wikitext2``, ``ptb``, ``c4``) read through ``datasets``,
which is optional and imported only when such a source is asked for. The whole text is tokenised
in one call and windows are cut from the token stream, as GPTQ-style tools do, so results compare
across tools.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import HUB_TEXT_SOURCES, TEXT_FILE_SUFFIXES, TEXT_SOURCES

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")

_C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


@dataclass(frozen=True)
class CalibConfig:
    """Which calibration windows to draw (DESIGN.md section 2: 128 windows of 512 tokens).

    Start positions are drawn uniformly from ``[start, end - seqlen)`` of the tokenised source;
    ``end`` None means the end of the text.
    """

    source: str = "builtin"  # builtin, wikitext2, ptb, c4, or a .txt/.jsonl path
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    start: int = 0  # first token a window may start at
    end: int | None = None  # windows end before this token; None: end of the text

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(
                f"source={self.source!r}: use one of {', '.join(TEXT_SOURCES)} or a path"
            )
        if not _is_int(self.nsamples) or self.nsamples < 1:
            raise ValueError(f"nsamples={self.nsamples!r}: use a positive integer, e.g. 128")
        if not _is_int(self.seqlen) or self.seqlen < 2:
            raise ValueError(f"seqlen={self.seqlen!r}: use an integer >= 2, e.g. 512")
        if not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r}: use an integer, e.g. 0")
        if not _is_int(self.start) or self.start < 0:
            raise ValueError(f"start={self.start!r}: use a token index >= 0")
        if self.end is not None:
            if not _is_int(self.end):
                raise ValueError(f"end={self.end!r}: use a token index or None")
            if self.end - self.start <= self.seqlen:
                raise ValueError(
                    f"end={self.end} leaves no room for {self.seqlen}-token windows after "
                    f"start={self.start}: use end > {self.start + self.seqlen}"
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_text(source: str, split: str = "test") -> str:
    """Read a text corpus.

    Args:
        source: ``builtin`` (CPython's pydoc topics, ~460 kB of English, sorted by topic),
            ``wikitext2`` (wikitext-2-raw-v1), ``ptb`` (ptb_text_only), ``c4`` (allenai/c4 ``en``,
            first shard), or a path to a ``.txt`` (read whole) or ``.jsonl`` file (one JSON
            object with a ``text`` field per line).
        split: hub datasets only: ``train`` (calibration), ``validation`` or ``test``
            (evaluation). C4 has no test split: ``test`` reads its validation shard.
    Returns:
        The text; documents are joined by a blank line (PTB sentences by a space, as GPTQ does).
    """
    if source == "builtin":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    if source in HUB_TEXT_SOURCES:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
        return _load_hub(source, split)
    if source.endswith(TEXT_FILE_SUFFIXES):
        return _load_file(Path(source))
    raise ValueError(
        f"unknown text source {source!r}: use one of {', '.join(TEXT_SOURCES)}, "
        "or a path to a .txt or .jsonl file"
    )


def _load_file(path: Path) -> str:
    """Read a .txt or .jsonl file, rejecting missing, binary and empty files."""
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise ValueError(f"{path} is binary (contains NUL bytes): give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start}): give a UTF-8 text file"
        ) from None
    # universal newlines, as Python's text mode reads: a corpus saved with Windows line endings
    # (the shared WikiText-2 file is) tokenizes exactly like the original
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if path.suffix == ".jsonl":
        text = "\n\n".join(_jsonl_texts(path, text))
    if not text.strip():
        raise ValueError(f"{path} holds no text: give a non-empty file")
    return text


def _jsonl_texts(path: Path, text: str) -> list[str]:
    """The ``text`` field of every non-blank line of a JSON-lines file."""
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not valid JSON: one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{number} has no string "text" field: use {{"text": "..."}}')
        texts.append(record["text"])
    return texts


def _load_hub(source: str, split: str) -> str:
    """Download (or read from the cache) a hub dataset through the optional ``datasets``."""
    hint = "or give a local .txt file, e.g. ../shared/data/wikitext2-test.txt"
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"source {source!r} needs the datasets package (pip install datasets) {hint}"
        ) from None
    try:
        if source == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(rows["text"])
        if source == "ptb":
            rows = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(rows["sentence"])
        shard = "train" if split == "train" else "validation"
        rows = datasets.load_dataset(
            "allenai/c4", data_files={shard: _C4_SHARDS[shard]}, split=shard
        )
        return "\n\n".join(rows["text"])
    except Exception as err:  # network, hub and cache errors all end the same way for the user
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load {source!r} from the hub ({cause}) {hint}") from err


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """Tokenise a whole text in one call.

    Args:
        tokenizer: a Hugging Face tokenizer; special tokens are added as it does by default.
        text: the corpus.
    Returns:
        (ntokens,) int64 token ids.
    """
    # verbose=False: the text is meant to be longer than the model's context, so the tokenizer's
    # "sequence longer than the maximum length" warning is noise here
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]  # (1, ntokens)
    return ids[0].to(torch.int64)


def calibration_windows(
    tokens: Tensor,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    start: int = 0,
    end: int | None = None,
) -> Tensor:
    """Random windows for calibration, with GPTQ's start-position draw.

    Starts are ``torch.randint(start, end - seqlen, (nsamples,))`` from a generator seeded with
    ``seed``, so every window lies in ``[start, end)`` and the draw matches other tools.

    Args:
        tokens: (ntokens,) token ids.
        nsamples: number of windows.
        seqlen: tokens per window.
        seed: generator seed.
        start: first token a window may start at.
        end: windows end at or before this token; None: ``ntokens``.
    Returns:
        (nsamples, seqlen) int64 windows.
    """
    ntokens = tokens.numel()
    if nsamples < 1 or seqlen < 2 or start < 0:
        raise ValueError(f"nsamples={nsamples}, seqlen={seqlen}, start={start}: use >= 1, 2, 0")
    if end is not None and end > ntokens:
        raise ValueError(f"end={end} is past the end of the text ({ntokens} tokens): lower it")
    stop = ntokens if end is None else end
    if stop - start <= seqlen:
        where = "" if end is None else f" before end={end}"
        raise ValueError(
            f"the text has {ntokens} tokens; {seqlen}-token windows starting at token {start}"
            f"{where} need at least {start + seqlen + 1}: use a longer text, a smaller seqlen"
            f"{' or an earlier start' if start else ''}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(start, stop - seqlen, (nsamples,), generator=generator)  # (nsamples,)
    offsets = torch.arange(seqlen)  # (seqlen,)
    return tokens.to(torch.int64)[starts[:, None] + offsets]  # (nsamples, seqlen)


def eval_windows(tokens: Tensor, seqlen: int, nwindows: int | None = None) -> Tensor:
    """The first non-overlapping windows of a token stream, in order (the perplexity protocol).

    Args:
        tokens: (ntokens,) token ids.
        seqlen: tokens per window.
        nwindows: how many windows; None: all that fit (a trailing partial window is dropped).
    Returns:
        (n, seqlen) int64 windows; window i is ``tokens[i * seqlen : (i + 1) * seqlen]``.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: use an integer >= 2, e.g. 2048")
    if nwindows is not None and nwindows < 1:
        raise ValueError(f"nwindows={nwindows}: use a positive integer, or None for all")
    available = tokens.numel() // seqlen
    n = max(available, 1) if nwindows is None else nwindows
    if available < n:
        raise ValueError(
            f"the text has {tokens.numel()} tokens; {n} windows of {seqlen} need "
            f"{n * seqlen}: use a longer text, fewer windows or a smaller seqlen"
        )
    return tokens[: n * seqlen].to(torch.int64).view(n, seqlen)


def calibration_start(
    calib: str, eval_sources: list[str], eval_windows: int | None, eval_seqlen: int
) -> int | None:
    """Where calibration windows may start so that they share no token with the evaluation.

    Hub sources calibrate on their train split and evaluate on test, so they never overlap; a
    local file or ``builtin`` that serves both calibrates after the evaluated windows, as
    perplexity measured on calibration tokens would flatter every method.

    Returns:
        The first token, or None when the same text is evaluated in full (no start avoids it).
    """
    if calib in HUB_TEXT_SOURCES or calib not in eval_sources:
        return 0
    if eval_windows is None:
        return None
    return eval_windows * eval_seqlen

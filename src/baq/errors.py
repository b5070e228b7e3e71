"""One-line error messages (no torch import, so the CLI's argument checks stay fast)."""

from __future__ import annotations

MAX_CHARS = 300


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, for a one-line error.

    transformers and datasets errors span paragraphs; an ``OSError`` with an errno gives its
    ``strerror`` (the caller names the path). Cut to ``MAX_CHARS`` characters.
    """
    text = getattr(err, "strerror", None) or str(err)
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    text = lines[0].rstrip(":") if lines else type(err).__name__
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."

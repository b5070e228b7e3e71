"""Perplexity of a causal LM over token windows (the GPTQ evaluation protocol)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def perplexity(
    model: nn.Module, windows: Tensor, device: torch.device | str | None = None, desc: str = "ppl"
) -> float:
    """Perplexity ``exp(mean_w mean_t nll(w, t))`` over windows scored one at a time.

    Each window is one forward (batch 1, no KV cache); token ``t + 1`` is predicted from tokens
    ``0..t`` for ``t = 0..seq-2``, with logits in float32. Averaging the per-window means equals
    GPTQ's ``exp(sum(loss_w * seqlen) / (n * seqlen))`` since all windows have the same length.

    Args:
        model: causal LM returning ``.logits`` of shape (1, seq, vocab); put it on ``device``.
        windows: (n, seq) int64 token windows, e.g. from ``data.eval_windows``.
        device: where the windows are sent; None: the device of the model's first parameter.
        desc: progress bar label.
    Returns:
        The perplexity (``nan`` if the model produced NaN logits).
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows has shape {tuple(windows.shape)}: expected (n >= 1, seq >= 2)")
    if device is None:
        device = next(model.parameters()).device
    losses = []
    with torch.inference_mode():
        for window in tqdm(windows, desc=desc, disable=None, leave=False):
            ids = window[None].to(device)  # (1, seq)
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # (seq, vocab)
            # mean over the seq - 1 predicted positions of this window
            loss = F.cross_entropy(logits[:-1], ids[0, 1:])
            losses.append(loss.item())
    mean_nll = math.fsum(losses) / len(losses)
    if math.isnan(mean_nll):
        log.warning("%s: the model produced NaN logits", desc)
        return math.nan
    ppl = math.exp(mean_nll) if mean_nll <= 709.0 else math.inf  # exp overflows a double past 709
    log.info("%s: perplexity %.4f over %d windows of %d tokens", desc, ppl, *windows.shape)
    return ppl

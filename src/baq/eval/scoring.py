"""Perplexity of a causal LM over token windows (the GPTQ evaluation protocol), and in the same
pass its KL divergence against a base model (:mod:`baq.eval.divergence`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from baq.eval import divergence
from baq.eval.divergence import BaseRecord, PositionStats

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """What one pass over the windows measured.

    Attributes:
        perplexity: ``exp(mean_w mean_t nll)``.
        divergence: KL statistics against the base (:meth:`PositionStats.summary`), or None.
        base_record: the compact base sides of these windows when asked to record them.
    """

    perplexity: float
    divergence: dict[str, float] | None = None
    base_record: BaseRecord | None = None


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
    return score(model, windows, device, desc).perplexity


def score(
    model: nn.Module,
    windows: Tensor,
    device: torch.device | str | None = None,
    desc: str = "ppl",
    base_model: nn.Module | None = None,
    base_record: BaseRecord | None = None,
    record_topk: int | None = None,
    base_name: str = "base",
) -> Scores:
    """Perplexity and, against a base, KL divergence, in one forward per window.

    Only one window's logits (two with ``base_model``) exist at a time, so memory does not grow
    with the number of windows; a few numbers per position are kept for the statistics.

    Args:
        model: the model scored (as in :func:`perplexity`).
        windows: (n, seq) int64 token windows.
        device: where the windows go (default: the model's).
        desc: progress bar label.
        base_model: exact KL: this model's logits of each window are computed alongside (on the
            same device).
        base_record: compact KL against a stored base (checked against ``windows``).
        record_topk: also record a compact base side with this many top tokens: ``model``'s own
            (to compare a later model against it without keeping it), or with ``base_model``
            the base's, whose compact KL is then reported beside the exact one.
        base_name: the base model's name, stored in the record.
    Returns:
        :class:`Scores`.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows has shape {tuple(windows.shape)}: expected (n >= 1, seq >= 2)")
    if base_model is not None and base_record is not None:
        raise ValueError("give base_model or base_record, not both")
    if device is None:
        device = next(model.parameters()).device
    losses, stats, compact = [], PositionStats(), PositionStats()
    recorded: list[divergence.BaseWindow] = []
    with torch.inference_mode():
        for w, window in enumerate(tqdm(windows, desc=desc, disable=None, leave=False)):
            ids = window[None].to(device)  # (1, seq)
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # (seq, vocab)
            if base_record is not None and w == 0:
                base_record.check(windows, logits.shape[-1])
            targets, vocab = ids[0, 1:], logits.shape[-1]
            # mean over the seq - 1 predicted positions of this window
            losses.append(F.cross_entropy(logits[:-1], targets).item())
            if record_topk is not None and base_model is None:
                recorded.append(divergence.compact_window(logits[:-1], targets, record_topk))
            if base_model is not None:
                base = base_model(input_ids=ids, use_cache=False).logits[0].float()
                stats.add(*divergence.exact_window(base[:-1], logits[:-1], targets))
                if record_topk is not None:  # the base's record, and what its KL would say
                    recorded.append(divergence.compact_window(base[:-1], targets, record_topk))
                    compact.add(*divergence.compact_kl(recorded[-1], logits[:-1], targets))
                del base
            elif base_record is not None:
                bw = base_record.windows[w]
                stats.add(*divergence.compact_kl(bw, logits[:-1], targets))
            del logits
    mean_nll = math.fsum(losses) / len(losses)
    if math.isnan(mean_nll):
        log.warning("%s: the model produced NaN logits", desc)
        ppl = math.nan
    else:
        ppl = math.exp(mean_nll) if mean_nll <= 709.0 else math.inf  # exp overflows past 709
        log.info("%s: perplexity %.4f over %d windows of %d tokens", desc, ppl, *windows.shape)
    out = Scores(ppl)
    if stats.kl:
        out.divergence = stats.summary()
        if compact.kl:  # the cost of the compact record, measured on the same positions
            out.divergence["kl_mean_compact"] = compact.summary()["kl_mean"]
            out.divergence["kl_compact_topk"] = record_topk
        log.info("%s: %s", desc, divergence.describe(out.divergence).replace("\n", "; "))
    if record_topk is not None:
        out.base_record = BaseRecord(
            recorded, divergence.windows_digest(windows), vocab, base_name, record_topk
        )
    return out


def score_sets(
    model: nn.Module,
    sets: dict[str, Tensor],
    device: torch.device | str,
    when: str,
    base_records: dict[str, BaseRecord] | None = None,
    **base: object,
) -> dict[str, Scores]:
    """:func:`score` of every set of windows, logged; ``base`` holds ``base_model=``,
    ``record_topk=`` or ``base_name=`` as :func:`score` takes them, ``base_records`` a stored
    base side per set name (a set without one gets no KL from it)."""
    out = {}
    for name, windows in sets.items():
        extra = {**base, "base_record": (base_records or {}).get(name)}
        out[name] = score(model, windows, device=device, desc=f"ppl {name} {when}", **extra)
        log.info("perplexity %s %s: %.3f", name, when, out[name].perplexity)
    return out

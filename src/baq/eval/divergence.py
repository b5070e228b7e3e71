"""KL divergence of a model against its base model, token by token (DESIGN.md section 1).

Perplexity compares a model with the text; the KL divergence ``KL(p_base || p_q)`` compares it
with the model it came from, at every position over the whole vocabulary. The statistics follow
llama.cpp's ``llama-perplexity --kl-divergence`` so the numbers compare: mean KL with its standard
error, median, 90/95/99/99.9 percentiles and maximum; the share of positions whose most likely
token agrees (with its standard error); the RMS of ``dp = p_q(x_next) - p_base(x_next)``; the mean
of ``ln(PPL(Q) / PPL(base))`` (per-token NLL differences, with standard error). Unlike llama.cpp,
which scores the second half of each window, every predicted position counts, as in perplexity.

The base side is either exact (the base model's logits of the same window, computed alongside)
or a compact record (:class:`BaseRecord`): per position the ``k`` largest base log-probabilities
with their token ids, and the base log-probability of the actual next token. Its KL merges the
tokens outside the top ``k`` into one bin on both sides,

    KL_k = sum_{i in top k} p_i (log p_i - log q_i) + r (log r - log s),
    r = 1 - sum_{top k} p_i,  s = 1 - sum_{top k} q_i,

which by the log-sum inequality never exceeds the exact KL (merging outcomes loses information);
the gap is measured in docs/RESULTS.md. Memory: one window's logits at a time, and positions are
processed in chunks so the log-softmaxes stay small; only a few numbers per position are kept.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

CHUNK = 256  # positions per log-softmax: (256, vocab) float32 is 50 MB at a 49152 vocabulary
BASE_FORMAT = "baq-base-logits/1"


def _log_softmax_chunks(logits: Tensor):
    for a in range(0, logits.shape[0], CHUNK):
        yield a, torch.log_softmax(logits[a : a + CHUNK].float(), dim=-1)


@dataclass
class PositionStats:
    """Per-position numbers of one or more windows; :meth:`summary` turns them into the report."""

    kl: list[Tensor] = field(default_factory=list)  # (positions,) float64
    agree: list[Tensor] = field(default_factory=list)  # (positions,) bool: same top token
    dp: list[Tensor] = field(default_factory=list)  # p_q(next) - p_base(next)
    dnll: list[Tensor] = field(default_factory=list)  # nll_q(next) - nll_base(next)

    def add(self, kl: Tensor, agree: Tensor, dp: Tensor, dnll: Tensor) -> None:
        self.kl.append(kl.double().cpu())
        self.agree.append(agree.cpu())
        self.dp.append(dp.double().cpu())
        self.dnll.append(dnll.double().cpu())

    def summary(self) -> dict[str, float]:
        """llama.cpp's KL statistics (keys name what they are; all contain ``kl`` or ``top``)."""
        kl = torch.cat(self.kl)
        n = kl.numel()
        agree = torch.cat(self.agree).double()
        dp = torch.cat(self.dp)
        dnll = torch.cat(self.dnll)
        same = float(agree.mean())
        q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.95, 0.99, 0.999], dtype=torch.float64))
        return {
            "kl_mean": float(kl.mean()),
            "kl_mean_stderr": _stderr(kl),
            "kl_median": float(q[0]),
            "kl_p90": float(q[1]),
            "kl_p95": float(q[2]),
            "kl_p99": float(q[3]),
            "kl_p999": float(q[4]),
            "kl_max": float(kl.max()),
            "kl_top_token_agreement": same,
            "kl_top_token_agreement_stderr": math.sqrt(max(same * (1 - same), 0.0) / n),
            "kl_rms_dp": float(dp.square().mean().sqrt()),
            "kl_mean_ln_ppl_ratio": float(dnll.mean()),
            "kl_mean_ln_ppl_ratio_stderr": _stderr(dnll),
            "kl_positions": n,
        }


def _stderr(x: Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else math.nan


def exact_window(base_logits: Tensor, logits: Tensor, targets: Tensor) -> tuple[Tensor, ...]:
    """Per-position KL, top-token agreement, dp and dnll from both models' full logits.

    Args:
        base_logits, logits: (positions, vocab) logits of the base and the compared model.
        targets: (positions,) the actual next tokens.
    Returns:
        ``(kl, agree, dp, dnll)``, each (positions,).
    """
    out = []
    for a, lp in _log_softmax_chunks(base_logits):
        lq = torch.log_softmax(logits[a : a + CHUNK].float(), dim=-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        t = targets[a : a + CHUNK, None]
        lp_t, lq_t = lp.gather(1, t)[:, 0], lq.gather(1, t)[:, 0]
        agree = lp.argmax(-1) == lq.argmax(-1)
        out.append((kl, agree, lq_t.exp() - lp_t.exp(), lp_t - lq_t))
    return tuple(torch.cat(parts) for parts in zip(*out))


@dataclass
class BaseWindow:
    """The compact base side of one window: top-k log-probs and the next token's log-prob."""

    topk_logp: Tensor  # (positions, k) float32, descending
    topk_ids: Tensor  # (positions, k) int32 (half the memory of int64; a vocabulary fits)
    target_logp: Tensor  # (positions,) float32


def compact_window(base_logits: Tensor, targets: Tensor, k: int) -> BaseWindow:
    """The :class:`BaseWindow` of (positions, vocab) base logits."""
    parts = []
    for a, lp in _log_softmax_chunks(base_logits):
        top = lp.topk(min(k, lp.shape[1]), dim=-1)
        ids = top.indices.to(torch.int32)
        parts.append((top.values, ids, lp.gather(1, targets[a : a + CHUNK, None])[:, 0]))
    v, i, t = (torch.cat(p) for p in zip(*parts))
    return BaseWindow(v, i, t)


def compact_kl(base: BaseWindow, logits: Tensor, targets: Tensor) -> tuple[Tensor, ...]:
    """Per-position statistics against a compact base (the merged-tail KL of the module doc)."""
    out = []
    for a, lq in _log_softmax_chunks(logits):
        lp_k = base.topk_logp[a : a + CHUNK].to(lq.device)
        ids = base.topk_ids[a : a + CHUNK].to(lq.device, torch.int64)
        lq_k = lq.gather(1, ids)
        p_k = lp_k.exp()
        r = (1 - p_k.sum(-1)).clamp(min=0)
        s = (1 - lq_k.exp().sum(-1)).clamp(min=1e-30)
        tail = torch.where(r > 0, r * (torch.log(r.clamp(min=1e-30)) - torch.log(s)), 0.0)
        kl = (p_k * (lp_k - lq_k)).sum(-1) + tail
        t = targets[a : a + CHUNK, None]
        lp_t = base.target_logp[a : a + CHUNK].to(lq.device)
        lq_t = lq.gather(1, t)[:, 0]
        agree = ids[:, 0] == lq.argmax(-1)
        out.append((kl.clamp(min=0), agree, lq_t.exp() - lp_t.exp(), lp_t - lq_t))
    return tuple(torch.cat(parts) for parts in zip(*out))


def windows_digest(windows: Tensor) -> str:
    """Hash of the token windows: the text, the tokenizer and the windowing in one value."""
    return hashlib.sha256(windows.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


@dataclass
class BaseRecord:
    """Compact base sides of a set of windows, reusable across runs (``--base-logits FILE``)."""

    windows: list[BaseWindow]
    digest: str  # windows_digest of the windows they were computed on
    vocab: int
    base: str  # name of the base model, for the refusal message
    k: int

    def check(self, windows: Tensor, vocab: int | None = None) -> None:
        """Refuse (``ValueError``, one line) a record made on other windows or vocabulary."""
        if windows_digest(windows) != self.digest or len(windows) != len(self.windows):
            raise ValueError(
                f"base logits of {self.base} were computed on other token windows (text, "
                "tokenizer, --eval-seqlen or --eval-windows differ): recompute them with "
                "--base BASE_MODEL --base-logits NEW_FILE"
            )
        if vocab is not None and vocab != self.vocab:
            raise ValueError(
                f"base logits of {self.base} have a {self.vocab}-token vocabulary, this model "
                f"{vocab}: they belong to another model family; recompute them"
            )

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file (atomic): stacked top-k log-probs, ids and target log-probs."""
        from baq.run.report import write_safetensors

        tensors = {
            "topk_logp": torch.stack([w.topk_logp for w in self.windows]).contiguous(),
            "topk_ids": torch.stack([w.topk_ids.to(torch.int32) for w in self.windows]),
            "target_logp": torch.stack([w.target_logp for w in self.windows]).contiguous(),
        }
        meta = {"format": BASE_FORMAT, "digest": self.digest, "vocab": str(self.vocab)}
        meta |= {"base": self.base, "k": str(self.k)}
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BaseRecord:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != BASE_FORMAT:
                    raise ValueError("not a baq base-logits file")
                t = {k: f.get_tensor(k) for k in ("topk_logp", "topk_ids", "target_logp")}
        except Exception as err:  # safetensors raises its own error type on a damaged header
            raise ValueError(
                f"{path}: not a readable base-logits file ({err}); write one with "
                "--base BASE_MODEL --base-logits FILE"
            ) from None
        windows = [
            BaseWindow(v, i.to(torch.int32), tl)
            for v, i, tl in zip(t["topk_logp"], t["topk_ids"], t["target_logp"])
        ]
        return cls(windows, meta["digest"], int(meta["vocab"]), meta["base"], int(meta["k"]))


def describe(summary: dict[str, float]) -> str:
    """Two lines in llama.cpp's order: KL statistics, then top-token agreement and dp."""
    s = summary
    return (
        f"KL divergence {s['kl_mean']:.5f} ± {s['kl_mean_stderr']:.5f} (median "
        f"{s['kl_median']:.5f}, p99 {s['kl_p99']:.4f}, max {s['kl_max']:.3f}); "
        f"ln(PPL(Q)/PPL(base)) {s['kl_mean_ln_ppl_ratio']:.5f}\n"
        f"same top token {100 * s['kl_top_token_agreement']:.2f} ± "
        f"{100 * s['kl_top_token_agreement_stderr']:.2f} %; RMS dp "
        f"{100 * s['kl_rms_dp']:.3f} %"
    )

"""The output head as one more layer after the last decoder block (``--include-head``).

The head reads the final norm of the last block's output, so its Hessian proxy
``H = 2 X X^T / n`` is accumulated from the last block's outputs (the quantized blocks' in the
sequential driver, the float ones in the measurement) through that norm, in the Hessian dtype of
the blocks' linears. The accumulator is fed directly rather than from a hook on the head: a hook
would need the head's forward, ``seqlen x vocab`` logits per window, which the Hessian does not
use. The head is then solved like any linear (:func:`baq.run.quantization.solve_targets`).

When the head's weight is the input embedding's (``tie_word_embeddings``), writing the solved
weight back rewrites the embedding too: the model then embeds its tokens with the quantized
matrix, and a saved folder stores that matrix once, packed (docs/FORMAT.md, section 2).

With ``--rotate`` the head is rotated like any linear (its input, the normed hidden state, is
what the packed head transforms at run time); what is written back, and what a tied embedding
reads, is the quantized matrix in the original basis, so embedding lookups need no transform.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from baq.model import blocks
from baq.run.activations import ActivationStore
from baq.run.hessian import HessianAccumulator

log = logging.getLogger(__name__)


def head_target(model: nn.Module) -> dict[str, nn.Module]:
    """The output head as ``{full module name: linear}``, e.g. ``{"lm_head": Linear}``.

    Raises:
        ValueError: the model has no linear output head, or no final norm to read its input
            from (one line, with the fix).
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, (nn.Linear, Conv1D)):
        raise ValueError(
            f"{type(model).__name__} has no linear output head ({type(head).__name__}): "
            "drop --include-head"
        )
    _final_norm(model)
    name = next(n for n, m in model.named_modules() if m is head)
    return {name: head}


def _final_norm(model: nn.Module) -> nn.Module:
    try:
        return blocks.final_norm(model)
    except ValueError as err:
        raise ValueError(f"{err}: the head's input is unknown; drop --include-head") from None


def tied_embedding(model: nn.Module) -> str | None:
    """Name of the input embedding whose weight is the head's very tensor, or None."""
    (head,) = head_target(model).values()
    embedding = model.get_input_embeddings()
    if embedding is None or getattr(embedding, "weight", None) is not head.weight:
        return None
    return next(n for n, m in model.named_modules() if m is embedding)


def log_tie(model: nn.Module) -> None:
    """Say that the embedding now reads the quantized head (or that it stays float)."""
    (name,) = head_target(model)
    embedding = tied_embedding(model)
    if embedding is not None:
        log.info("%s is tied to %s: the embedding now reads the quantized matrix", name, embedding)
    else:
        log.info("%s is not tied to the input embedding, which stays in float", name)


def head_hessian(
    model: nn.Module,
    outputs: ActivationStore | Tensor,
    device: torch.device,
    batch: int,
    dtype: torch.dtype,
) -> Tensor:
    """The head's Hessian proxy from the last block's outputs.

    Args:
        model: the causal LM (its final norm is moved to ``device`` and back).
        outputs: (nsamples, seqlen, hidden) outputs of the last decoder block.
        device: where the norm and the accumulation run.
        batch: samples per norm forward.
        dtype: accumulation dtype (float32 or float64).
    Returns:
        (hidden, hidden) ``H = 2 X X^T / n`` of ``X = final_norm(outputs)`` over every token.
    """
    norm = _final_norm(model)
    home = next(norm.parameters(), torch.empty(0)).device
    acc: HessianAccumulator | None = None
    norm.to(device)
    try:
        with torch.inference_mode():
            for s in range(0, len(outputs), batch):
                x = norm(outputs[s : s + batch].to(device))  # (batch, seq, hidden)
                if acc is None:
                    acc = HessianAccumulator(x.shape[-1], x.device, dtype)
                acc.add(x)
    finally:
        norm.to(home)
    assert acc is not None, "no calibration outputs reached the head"
    return acc.hessian()

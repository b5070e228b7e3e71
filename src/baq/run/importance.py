"""How much one unit of a layer's proxy loss costs the model: ``beta_l`` (DESIGN.md section 1,
"Model-level allocation").

A layer's proxy loss ``sum_j l_j ~ mean_t |dW x_t|^2`` is in units of its own output error. With
``y_l`` the layer's output and the model's loss per token ``L``, a small output error ``dy``
raises the KL divergence of the logits by about ``1/2 dy^T F_y dy`` (``F_y`` the Fisher
information of the logits' distribution w.r.t. ``y``); taking ``F_y`` isotropic,
``F_y ~ (tr F_y / out_l) I``, gives ``KL ~ beta_l * proxy loss`` with

    beta_l = E_t |dL/dy_t|^2 / (2 out_l)                               (Fisher estimator)

where the expectation runs over tokens and over next tokens drawn from the model itself (the
true Fisher, not the empirical one: it is the curvature of the KL against the model). One
backward per calibration window serves every layer at once (as in YAQA and output-adaptive
calibration). The second estimator measures the same slope directly, as HIGGS does: perturb
one layer with noise of the size of 3-bit round-to-nearest, measure the proxy loss it causes
and the KL divergence of the logits against the unperturbed model, ``beta_l = KL / proxy``
(a slope through the origin). It needs one forward from the layer's block onwards per layer.

Both are measured on the float model as it is, also for a run with ``--rotate``: a layer's
output error ``dW x = dW' (R x)`` and its proxy loss do not depend on the input basis, so
``beta_l`` prices a rotated layer's loss as it does the unrotated one's (the rotation enters the
measurement through the sensitivities, :mod:`baq.run.measure`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from baq.model import blocks
from baq.run import streaming
from baq.run.walker import bar_disabled

if TYPE_CHECKING:
    from baq.model.lazy import LazyLoader

log = logging.getLogger(__name__)

NOISE_BITS = 3  # the noise estimator's perturbation: uniform noise of a 3-bit row grid
NOISE_WINDOWS = 2  # calibration windows the noise estimator reads (one forward per layer each)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients (only activations'), restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def fisher_importance(
    model: nn.Module,
    windows: Tensor,
    targets: dict[str, nn.Module],
    device: torch.device,
    seed: int = 0,
    progress: bool | None = None,
    loader: LazyLoader | None = None,
) -> dict[str, float]:
    """The Fisher estimator ``beta_l = E_t |dL/dy_t|^2 / (2 out_l)`` for every target linear.

    ``L`` is the summed negative log-likelihood of next tokens sampled from the model's own
    predictions (seeded, one window after the other), so ``E |dL/dy_t|^2 = tr F_y`` at position
    ``t``. The backward runs block by block, as the quantization pass does: a forward stores
    each block's inputs (for these few windows only), the head's backward gives ``dL/dh`` at
    the last block's output, and each block, from the last to the first, is run again with
    gradients on its stored inputs and backpropagates ``dL/dh`` one block down. Only one block
    is needed at a time, so a lazily loaded model (``loader``) is measured in one block's memory
    plus ``2 (blocks + 1)`` window-sized activations per window; without a loader the result is
    that of one backward of the whole model (tests/test_importance.py checks it against one).

    Args:
        model: the float causal LM (on ``device``, or opened with ``baq.model.lazy.open_lazy``).
        windows: (n, seq) int64 calibration windows, one backward each.
        targets: full module name -> linear whose output error is priced (decoder blocks'
            linears and the output head).
        device: where the model runs.
        seed: seed of the sampled next tokens.
        progress: progress bar (None: on a terminal).
        loader: the :class:`baq.model.lazy.LazyLoader` of a lazily opened model.
    Returns:
        name -> beta_l (> 0).
    """
    layers = blocks.decoder_layers(model)
    prefix = blocks.module_prefix(model, layers)
    sums = {name: torch.zeros((), dtype=torch.float64) for name in targets}
    owner = {name: _block_of(name, prefix, len(layers)) for name in targets}
    gen = torch.Generator().manual_seed(seed)
    # no_grad, not inference_mode: the tensors must be usable in the backward below
    with torch.no_grad():
        states, kwargs = blocks.capture_block_inputs(model, windows, device)
    kwargs = blocks.move_kwargs(kwargs, device)
    # hidden[b][k]: window k entering block b (hidden[-1]: the last block's outputs), on the CPU
    hidden = [states]
    steps = len(layers) * 2 + 1
    bar = tqdm(total=steps, desc="fisher", disable=bar_disabled(progress), leave=False)
    try:
        for i in range(len(layers)):
            block, home = streaming.open_block(model, i, device, loader)
            hidden.append([blocks.run_block(block, h.to(device), kwargs).cpu() for h in hidden[-1]])
            del block
            streaming.close_block(model, i, home, loader)
            bar.update()
        head_names = [n for n in targets if owner[n] == len(layers)]
        grads = []
        with _frozen(model), _watched(targets, head_names, sums), torch.enable_grad():
            for h in hidden[-1]:
                x = h.to(device).requires_grad_(True)
                logits = _head(model, x).float()  # (seq, vocab)
                probs = torch.softmax(logits.detach(), dim=-1).cpu()
                labels = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
                F.cross_entropy(logits, labels, reduction="sum").backward()
                grads.append(x.grad.detach())
                del logits, probs
        bar.update()
        for i in reversed(range(len(layers))):
            block, home = streaming.open_block(model, i, device, loader)
            names = [n for n in targets if owner[n] == i]
            with _frozen(block), _watched(targets, names, sums), torch.enable_grad():
                for k, h in enumerate(hidden[i]):
                    x = h.to(device).requires_grad_(True)
                    y = blocks.block_output(block, x, kwargs)
                    y.backward(grads[k])
                    grads[k] = x.grad.detach()
            hidden[i + 1] = []  # no longer needed
            del block
            streaming.close_block(model, i, home, loader)
            bar.update()
    finally:
        bar.close()
    tokens = windows.numel()
    return {
        name: float(sums[name]) / tokens / (2 * _out_features(targets[name])) for name in targets
    }


def _block_of(name: str, prefix: str, n_blocks: int) -> int:
    """Index of the decoder block holding linear ``name``; ``n_blocks`` for the output head."""
    return int(name[len(prefix) :].split(".", 1)[0]) if name.startswith(prefix) else n_blocks


@contextmanager
def _watched(
    targets: dict[str, nn.Module], names: list[str], sums: dict[str, Tensor]
) -> Iterator[None]:
    """Inside, backwards add ``|dL/dy|^2`` of each named target's output ``y`` to its sum."""

    def watch(name: str):
        def grad_hook(g: Tensor) -> None:  # returns None: the gradient itself is unchanged
            sums[name].add_(g.detach().double().square().sum().cpu())

        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            if out.requires_grad:
                out.register_hook(grad_hook)

        return hook

    handles = [targets[n].register_forward_hook(watch(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def noise_importance(
    model: nn.Module,
    windows: Tensor,
    targets: dict[str, nn.Module],
    device: torch.device,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, float]:
    """The noise-injection estimator ``beta_l = KL / proxy loss`` for every target linear.

    Each layer in turn gets Gaussian noise whose per-row standard deviation is that of 3-bit
    round-to-nearest on the row's range (``range / (2^3 - 1) / sqrt(12)``); its proxy loss is
    measured on the same tokens (``mean_t |dW x_t|^2``, a forward hook), and the KL divergence
    of the logits against the unperturbed model is averaged over the predicted positions. Only
    the blocks from the layer's own onwards are run: the inputs of every block are computed once.
    The output head (``--include-head``) runs no block at all: its perturbed logits come from the
    last block's stored outputs. A tied embedding shares the perturbed weight, but the stored
    block inputs were computed before, so its beta prices the head's error alone.

    Args:
        model: the float causal LM (on ``device``).
        windows: (n, seq) int64 windows; every layer costs one partial forward of each.
        targets: full module name -> linear, each inside a decoder block or the output head.
        device: where the model runs.
        seed: seed of the noise.
    Returns:
        name -> beta_l (>= 0).
    """
    layers = blocks.decoder_layers(model)
    prefix = blocks.module_prefix(model, layers)
    ids = windows.to(device)
    with torch.inference_mode():
        states, kwargs = blocks.capture_block_inputs(model, ids, device)
        kwargs = blocks.move_kwargs(kwargs, device)
        inputs = [torch.cat(states).to(device)]  # inputs[b]: (n, seq, hidden) entering block b
        for block in layers:
            inputs.append(_run_each(block, inputs[-1], kwargs))
        base = [torch.log_softmax(_head(model, h[None]).float(), -1) for h in inputs[-1]]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for name, mod in tqdm(
        targets.items(), desc="noise", disable=bar_disabled(progress), leave=False
    ):
        b = _block_of(name, prefix, len(layers))  # the first block to run again
        W = blocks.get_weight(mod)
        Wf = W.float()
        lo, hi = Wf.min(dim=1).values.clamp(max=0), Wf.max(dim=1).values.clamp(min=0)
        std = (hi - lo) / (2**NOISE_BITS - 1) / math.sqrt(12)
        dW = std[:, None] * torch.randn(Wf.shape, generator=gen).to(Wf.device)
        proxy = {"sum": 0.0, "tokens": 0}

        def measure(m: nn.Module, args: tuple, dW: Tensor = dW, proxy: dict = proxy) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            proxy["sum"] += float(F.linear(x, dW).double().square().sum())
            proxy["tokens"] += x.shape[0]

        handle = mod.register_forward_pre_hook(measure)
        blocks.set_weight(mod, (Wf + dW).to(W.dtype))
        try:
            with torch.inference_mode():
                h = inputs[b]
                for block in layers[b:]:
                    h = _run_each(block, h, kwargs)
                kl = 0.0
                for k in range(len(h)):
                    lq = torch.log_softmax(_head(model, h[k][None]).float(), -1)
                    lp = base[k]
                    kl += float((lp.exp() * (lp - lq)).sum(-1).mean())
        finally:
            handle.remove()
            blocks.set_weight(mod, W)
        loss = proxy["sum"] / max(proxy["tokens"], 1)
        out[name] = (kl / len(h)) / loss if loss > 0 else 0.0
    return out


def _run_each(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """The block on each window in turn (the captured kwargs are for one window)."""
    return torch.cat([blocks.run_block(block, h[None], kwargs) for h in hidden])


def _head(model: nn.Module, hidden: Tensor) -> Tensor:
    """Logits (seq, vocab) from the last block's output (1, seq, hidden): final norm, LM head."""
    try:
        norm = blocks.final_norm(model)
    except ValueError as err:
        raise ValueError(f"{err}; use --importance fisher") from None
    return model.get_output_embeddings()(norm(hidden))[0]


def _out_features(mod: nn.Module) -> int:
    return int(blocks.get_weight(mod).shape[0])

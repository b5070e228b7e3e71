"""Hessian proxies ``H = 2 X X^T / n`` of a block's linear layers, from forward hooks.

Two things keep this pass cheap, because on a CPU it costs about as much as the forward itself:

* ``X X^T`` is symmetric, so on the CPU only its lower triangle is accumulated, one strip of
  ``TILE`` rows at a time (about 0.6x the multiply-adds of the full product, and 0.65-0.75x the
  time at the reference model's widths); on other devices one ``addmm`` is faster.
* The block's forward stops as soon as the last hooked linear has seen its input: the rest of the
  block (the MLP's down projection and the residual) feeds no Hessian. Which call is the last is
  learnt from the first, complete forward.

Linears that read the very same input tensor (q/k/v read one normed hidden state, gate/up another)
share one accumulator: the Hessian is computed once per distinct input.

With ``--rotate`` the Hessians are still those of the unrotated inputs: each layer's is turned
into ``R H R^T`` once, where it is solved (:func:`baq.quant.layer.rotated_layer`), which costs
``O(cols^2 log cols)`` instead of a transform of every calibration token's input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

TILE = 192  # rows per strip of the lower triangle; 128-384 all time alike on a CPU


class StopForward(Exception):
    """Raised by a hook once every hooked linear of the block has seen its input."""


class HessianAccumulator:
    """Running ``sum x x^T`` and token count of one linear's inputs, in float32 or float64.

    On the CPU only the lower triangle of ``sum`` is accumulated and :meth:`hessian` mirrors it;
    elsewhere the full matrix is.
    """

    def __init__(self, cols: int, device: torch.device, dtype: torch.dtype) -> None:
        self.sum = torch.zeros(cols, cols, device=device, dtype=dtype)
        self.tokens = 0
        self._triangle = self.sum.device.type == "cpu"
        self._done = False  # sum has become H (hessian())

    def add(self, x: Tensor) -> None:
        if self._done:
            raise RuntimeError("inputs added after the Hessian was made")
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        if self._triangle:
            cols = x.shape[1]
            for a in range(0, cols, TILE):  # rows a:b of the lower triangle, with the diagonal
                b = min(a + TILE, cols)
                self.sum[a:b, :b].addmm_(x[:, a:b].t(), x[:, :b])
        else:
            self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def hessian(self) -> Tensor:
        """``H = 2 X X^T / n`` over the n tokens seen (full and symmetric), made in place.

        The accumulator's own matrix becomes ``H`` (the lower triangle mirrored strip by strip,
        then scaled), so a block's Hessians take one matrix each, not the four the out-of-place
        ``low + low.tril(-1).t()`` and the scaling held at once (a 28672-column float32 matrix
        is 3.3 GB). Linears that share this accumulator get the same tensor; no more inputs may
        be added after the first call.
        """
        if self._done:
            return self.sum
        s = self.sum
        # a matrix made under inference_mode (the walk's) may be changed in place only there
        with torch.inference_mode(s.is_inference()):
            if self._triangle:
                cols = s.shape[0]
                for a in range(0, cols, TILE):
                    b = min(a + TILE, cols)
                    d = s[a:b, a:b]
                    d.copy_(d.tril() + d.tril(-1).t())  # the strip's diagonal block
                    s[a:b, b:].copy_(s[b:, a:b].t())  # the rest of its rows: entries below
            s.mul_(2.0 / max(self.tokens, 1))
        self._done = True
        return s


@contextmanager
def hessian_hooks(
    block: nn.Module, linears: dict[str, nn.Module], dtype: torch.dtype, stop_early: bool = False
) -> Iterator[dict[str, HessianAccumulator]]:
    """Accumulate each linear's input Hessian during forwards of ``block``; hooks removed on exit.

    Args:
        block: the decoder block.
        linears: name -> linear module inside ``block`` whose inputs are accumulated.
        dtype: accumulation dtype (float32 or float64).
        stop_early: after the first complete forward, raise :class:`StopForward` from the last
            hooked call of every later forward (the caller catches it and skips the output).
    Yields:
        name -> :class:`HessianAccumulator` (shared objects for linears with a shared input).
    """
    accs: dict[str, HessianAccumulator] = {}
    seen: list[tuple[Tensor, str]] = []  # inputs of the current forward, kept alive for `is`
    calls = {"now": 0, "per_forward": 0}  # hooked calls in this forward / in a complete one

    def start(*_) -> None:
        seen.clear()
        calls["now"] = 0

    def finish(*_) -> None:
        calls["per_forward"] = calls["per_forward"] or calls["now"]

    def hook(mod: nn.Module, args: tuple, name: str) -> None:
        x = args[0]
        calls["now"] += 1
        for other, rep in seen:
            if other is x:
                accs[name] = accs[rep]
                break
        else:
            seen.append((x, name))
            if name not in accs:
                accs[name] = HessianAccumulator(x.shape[-1], x.device, dtype)
            accs[name].add(x)
        if stop_early and calls["now"] == calls["per_forward"]:
            raise StopForward

    handles = [block.register_forward_pre_hook(start), block.register_forward_hook(finish)]
    for name, mod in linears.items():
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name)))
    try:
        yield accs
    finally:
        seen.clear()
        for h in handles:
            h.remove()

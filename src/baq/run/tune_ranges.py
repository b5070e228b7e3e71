"""The trainable side of ``baq tune``: a saved model's packed linears with their ranges as
parameters, and the norm weights; written back into the :class:`PackedLinear` buffers at the end.

A packed layer's weight is, column by column (quant/grid.py, DESIGN.md section 1 "grid"),

    W[r, c] = (code[r, c] - zero) * step,   step = (hi - lo) / (L_c - 1),   zero = round(-lo / step)

with ``(lo, hi)`` the range of the group (r, c) belongs to. The integer codes are fixed. So is
every zero point: the format stores only ``lo`` and ``hi`` and rounds the zero point from them,
so a change of ``lo`` that keeps the span moves no weight until it flips a zero point, and then
moves a whole column by a whole step; that is not a continuous parameter. At fixed codes and
zero points a group's weights depend on its span alone: the continuous parameter of each range
group is a scale ``s`` with ``lo = s * lo0``, ``hi = s * hi0``, which keeps ``-lo / step`` and
hence every zero point (symmetric grids keep ``lo = -hi``). This is the step-size training of
EfficientQAT's end-to-end stage (Chen et al., 2024, E2E-QP) with the format's own zero points.

:class:`TunableLinear` computes the weight from the codes and the current ranges with the very
functions PackedLinear dequantizes with (:func:`~baq.quant.grid.column_params`,
:func:`~baq.quant.grid.dequantize_codes`), so at any scale its forward equals the forward of a
PackedLinear holding those ranges; ``torch.round`` has no gradient, so the gradient reaches the
scale through the step only. Without range groups (the default grids) a group is a row (per
OC) or a column (per IC), the weight is ``W0`` scaled along that axis (``W0`` the weight at
``s = 1``), and :class:`ScaledLinear` multiplies by ``W0`` once, made at the first step and kept,
scaling the output (per OC) or the input (per IC): no dequantization per step (the reference
model's step spent more time rebuilding its weights than multiplying by them), and the scale's
gradient in closed form, which saves the weight-gradient product, a third of a block's backward.
``s * W0`` equals the dequantization at the scaled ranges up to float rounding (exactly, in
real numbers); the reported KLs after training are the packed layers' own forward. Memory: the
unpacked codes, one byte per weight (two for columns of more than 256 levels), plus ``W0``
(float32) or with range groups per step a float32 weight kept for the backward and its
``code - zero``: at most 8 bytes per quantized weight, 0.85 GB on the 135M reference model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baq.quant.grid import Grid, column_params, dequantize_codes
from baq.saved.packed_linear import PackedLinear
from baq.saved.packing import unpack_columns

log = logging.getLogger(__name__)

# a range never shrinks to nothing or changes sign: the scale stays above this
MIN_SCALE = 1e-3


class TunableLinear(nn.Module):
    """A :class:`PackedLinear` whose range groups have a trainable scale (module doc).

    Args:
        layer: the packed layer; kept as the submodule ``packed`` (its bias and, when it has
            one, its ``transform_input`` serve the forward).

    Attributes:
        scale: (rows, ngroups) per OC, (ngroups, cols) per IC: the trainable factor, 1 at first.
    """

    def __init__(self, layer: PackedLinear) -> None:
        super().__init__()
        self.packed = layer
        packed = layer.packed
        levels = packed.levels()
        codes = unpack_columns(packed)  # (rows, cols) int64, original column order
        small = int(levels.max()) <= 256
        self.register_buffer("codes", codes.to(torch.uint8 if small else torch.int32))
        self.register_buffer("levels", levels)
        grid = layer.grid
        self.register_buffer("lo0", grid.lo.clone())
        self.register_buffer("hi0", grid.hi.clone())
        self.scale = nn.Parameter(torch.ones_like(grid.lo))
        self._w0: Tensor | None = None  # the weight at scale 1, made at the first fast forward

    def ranges(self) -> tuple[Tensor, Tensor]:
        """The current ``(lo, hi)``, float32, in the grid's shape."""
        s = self.scale.clamp(min=MIN_SCALE)
        return self.lo0 * s, self.hi0 * s

    def weight(self, scaled: bool = True) -> Tensor:
        """(out_features, in_features) float32 weight of the current ranges (differentiable);
        ``scaled=False``: of the saved ranges (scale 1)."""
        layer = self.packed
        lo, hi = self.ranges() if scaled else (self.lo0, self.hi0)
        grid = Grid(lo, hi, layer.group_size, layer.sym, layer.dim)
        step, zero = column_params(grid, self.levels, rows=layer.out_features)
        return dequantize_codes(self.codes, step, zero)

    def forward(self, x: Tensor) -> Tensor:
        layer = self.packed
        transform = getattr(layer, "transform_input", None)  # an input rotation, when stored
        if transform is not None:
            x = transform(x)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        if layer.group_size is None and self.scale.requires_grad:
            if self._w0 is None:
                with torch.no_grad():
                    self._w0 = self.weight(scaled=False)
            y = ScaledLinear.apply(x, self._w0.to(x.dtype), self.scale, layer.dim)
            return y if bias is None else y + bias.to(y.dtype)  # y in autocast's dtype
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def write_back(self) -> tuple[Tensor, Tensor]:
        """Store the current ranges into the packed layer, rounded to its range dtype (float16
        ranges stay float16, to nearest), and drop whatever weight the layer had cached.

        Returns:
            The stored ``(lo, hi)`` as float32.
        """
        layer = self.packed
        lo, hi = self.ranges()
        bits = layer.lo_bits.dtype
        dtype = torch.float16 if bits == torch.int16 else torch.float32
        lo, hi = lo.to(dtype), hi.to(dtype)
        layer.lo_bits.copy_(lo.view(bits))
        layer.hi_bits.copy_(hi.view(bits))
        layer.set_cache(layer.cache)  # the cached weight or offsets belong to the old ranges
        return lo.float(), hi.float()


class ScaledLinear(torch.autograd.Function):
    """``x @ W.T`` with ``W = s * W0`` along one axis (zero points fixed, no range groups): per
    OC ``y = s_r (x @ W0.T)[:, r]``, per IC ``y = (x * s) @ W0.T``; the scale's gradient without
    the weight's: per OC ``dL/ds_r = sum_t g[t, r] (x @ W0.T)[t, r]``, per IC
    ``dL/ds_c = sum_t x[t, c] (g @ W0)[t, c]``. Equals autograd's through
    :meth:`TunableLinear.weight` up to float rounding. Under autocast the products run in its
    dtype (the scale is cast to it; its gradient comes back float32)."""

    @staticmethod
    def forward(ctx, x: Tensor, W0: Tensor, scale: Tensor, dim: str) -> Tensor:
        s = scale.clamp(min=MIN_SCALE)
        ctx.dim = dim
        if dim == "oc":  # scale (rows, 1)
            y0 = F.linear(x, W0)
            ctx.save_for_backward(y0, W0, scale)
            return y0 * s[:, 0].to(y0.dtype)
        xs = x * s[0].to(x.dtype)  # scale (1, cols)
        y = F.linear(xs, W0)
        ctx.save_for_backward(x, W0, scale)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        kept, W0, scale = ctx.saved_tensors
        s = scale.clamp(min=MIN_SCALE)
        W0 = W0.to(g.dtype)  # under autocast the forward ran in g's dtype (bfloat16)
        live = scale >= MIN_SCALE  # below the floor the scale is a constant
        if ctx.dim == "oc":
            grad_x = (g * s[:, 0].to(g.dtype)) @ W0
            prod = (g * kept).reshape(-1, W0.shape[0]).sum(0)  # kept: x @ W0.T
            grad_s = prod.float().unsqueeze(1) * live
        else:
            gW = g @ W0
            grad_x = gW * s[0].to(gW.dtype)
            prod = (kept * gW).reshape(-1, W0.shape[1]).sum(0)  # kept: x
            grad_s = prod.float().unsqueeze(0) * live
        return grad_x, None, grad_s.to(scale.dtype), None


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every normalisation layer (RMSNorm, LayerNorm: by class name, as every
    architecture names them), by parameter name."""
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(w, nn.Parameter):
            out[f"{name}.weight"] = w
    return out


@contextmanager
def tunable(model: nn.Module, tune_norms: bool = False) -> Iterator[dict[str, nn.Parameter]]:
    """Swap every :class:`PackedLinear` of ``model`` for a :class:`TunableLinear` for the time
    of the block; the packed layers are put back on exit, untouched unless written back.

    A packed layer with aliases (a tied head whose embedding holds its dequantized weight) is
    left as it is: its alias would no longer be its weight.

    Args:
        model: a model loaded from a saved folder.
        tune_norms: the norm weights are trainable too (they train in place).
    Yields:
        The trainable parameters by name (``<linear>.scale``, ``<norm>.weight``), sorted.
    """
    swapped: dict[str, TunableLinear] = {}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for name, module in list(model.named_modules()):
            if not isinstance(module, PackedLinear):
                continue
            if module.aliases:
                log.info("%s: tied to %s, its ranges stay as saved", name, module.aliases)
                continue
            swapped[name] = TunableLinear(module)
            model.set_submodule(name, swapped[name])
        params = {f"{n}.scale": m.scale for n, m in swapped.items()}
        if tune_norms:
            for n, w in norm_weights(model).items():
                w.requires_grad_(True)
                params[n] = w
        yield dict(sorted(params.items()))
    finally:
        for name, wrapper in swapped.items():
            model.set_submodule(name, wrapper.packed)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)


def tunable_layers(model: nn.Module) -> dict[str, TunableLinear]:
    """The :class:`TunableLinear` modules of ``model`` (inside :func:`tunable`), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TunableLinear)}


def write_back(model: nn.Module) -> dict[str, float]:
    """Write every trained range into its packed layer (:meth:`TunableLinear.write_back`).

    Returns:
        Summary numbers: ``scale_mean`` and ``scale_min``/``scale_max`` of the factors the
        stored (rounded) ranges realise, and ``range_groups``.
    """
    scales = []
    for layer in tunable_layers(model).values():
        lo, hi = layer.write_back()
        span0 = layer.hi0 - layer.lo0
        scales.append(((hi - lo) / span0).flatten())
    if not scales:
        return {"range_groups": 0}
    s = torch.cat(scales)
    return {
        "range_groups": s.numel(),
        "scale_mean": float(s.mean()),
        "scale_min": float(s.min()),
        "scale_max": float(s.max()),
    }

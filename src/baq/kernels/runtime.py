"""Which CPU kernel a packed layer runs (issue 26): the native one where it compiles, else numba.

:func:`build` makes the layer's runtime layout for the kernel this machine can run, and
:func:`linear` multiplies by whichever layout it gets. The native kernel
(:mod:`baq.kernels.native`, lane fields, C++ compiled at first use) is about 3 times faster than
float32 ``F.linear`` on a 4096x14336 3-bit layer where the numba kernel (:mod:`baq.kernels.cpu`,
part streams) was no faster than float32 (docs/DESIGN.md, "Kernels"); numba stays as the
fallback for a machine without a C++ compiler or ninja (the failed build is logged once, at INFO).
Both are exact to float32 rounding and give the saved codes back byte for byte.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from baq.kernels import native
from baq.kernels.lanes import LaneLayout, build_lanes
from baq.kernels.layout import KernelLayout, build_layout
from baq.kernels.row_lanes import RowLaneLayout, build_row_lanes

RuntimeLayout = LaneLayout | RowLaneLayout | KernelLayout

log = logging.getLogger(__name__)


@functools.cache
def _warn_plain_loops() -> None:
    """Said once a process: without AVX512 or AVX2 (ARM, old x86) the native kernel runs plain
    C++ loops, which measured 4x slower than ``cache="codes"`` on 576x1536 (session 18)."""
    log.warning(
        "this CPU has neither AVX512 nor AVX2 with FMA: the packed kernel runs plain loops, "
        "slower than --cache codes (which holds one byte a weight); pass --cache codes "
        "(baq.set_cache(model, 'codes')) for speed"
    )


def build(
    codes: Tensor,
    levels: Tensor,
    group_size: int | None,
    sym: bool,
    dim: str = "oc",
    radix: bool = False,
    rows: bool = False,
) -> RuntimeLayout:
    """The runtime layout of one layer for the kernel this machine runs (arguments as
    :func:`baq.kernels.lanes.build_lanes`; ``radix``: the compact lane layout; ``rows``: the
    row-lane layout of :mod:`baq.kernels.row_lanes`, or the lane layout where it does not take
    the layer (per IC groups that split its 16-row blocks); both ignored by the numba fallback,
    which has neither)."""
    if native.library() is not None:
        if native.vector_bits() == 0:
            _warn_plain_loops()
        if rows:
            try:
                return build_row_lanes(codes, levels, group_size, sym, dim)
            except ValueError as err:
                log.info("row lanes do not take this layer (%s): lane layout", err)
        return build_lanes(codes, levels, group_size, sym, dim, radix=radix)
    return build_layout(codes, levels, group_size, sym, dim)


def linear(
    layout: RuntimeLayout, x: Tensor, lo: Tensor, hi: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``F.linear(x, W, bias)`` by the kernel of ``layout`` (:func:`baq.kernels.native.linear`
    or :func:`baq.kernels.cpu.linear`). Differentiable in ``x`` and ``bias`` where autograd asks
    (PEFT's LoRA trains adapters on packed layers, and the gradient of every earlier adapter
    flows through them): the backward multiplies by ``W`` in dequantized row tiles."""
    wants = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad)
    )
    if wants:
        return _KernelLinear.apply(x, layout, lo, hi, bias)
    return _forward(layout, x, lo, hi, bias)


def _forward(
    layout: RuntimeLayout, x: Tensor, lo: Tensor, hi: Tensor, bias: Tensor | None
) -> Tensor:
    if isinstance(layout, (LaneLayout, RowLaneLayout)):
        return native.linear(layout, x, lo, hi, bias)
    from baq.kernels import cpu  # numba, imported only where the fallback runs

    return cpu.linear(layout, x, lo, hi, bias)


def dequantize_rows(layout: RuntimeLayout, lo: Tensor, hi: Tensor, r0: int, r1: int) -> Tensor:
    """(r1 - r0, cols) float32 rows of ``W`` from either kernel's layout."""
    if isinstance(layout, (LaneLayout, RowLaneLayout)):
        return native.dequantize_rows(layout, lo, hi, r0, r1)
    from baq.kernels import cpu

    return cpu.dequantize_rows(layout, lo, hi, r0, r1)


class _KernelLinear(torch.autograd.Function):
    """The kernel's product with a backward: ``dx = dy W`` (``W`` one tile of
    :data:`~baq.kernels.native.TILE_ROWS` rows at a time, never whole), ``dbias = sum dy``. The
    codes and ranges are constants here (``baq tune`` trains ranges through its own forward)."""

    @staticmethod
    def forward(ctx, x, layout, lo, hi, bias):  # type: ignore[override]
        ctx.layout, ctx.x_shape, ctx.x_dtype = layout, x.shape, x.dtype
        ctx.save_for_backward(lo.detach(), hi.detach())
        return _forward(layout, x.detach(), lo.detach(), hi.detach(), bias)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        layout = ctx.layout
        lo, hi = ctx.saved_tensors
        g = dy.reshape(-1, layout.rows).float()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.zeros(g.shape[0], layout.cols)
            for r0 in range(0, layout.rows, native.TILE_ROWS):
                r1 = min(r0 + native.TILE_ROWS, layout.rows)
                dx.addmm_(g[:, r0:r1], dequantize_rows(layout, lo, hi, r0, r1))
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        dbias = g.sum(0).to(dy.dtype) if ctx.needs_input_grad[4] else None
        return dx, None, None, None, dbias


__all__ = ["RuntimeLayout", "build", "dequantize_rows", "linear"]

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

from torch import Tensor

from baq.kernels import native
from baq.kernels.lanes import LaneLayout, build_lanes
from baq.kernels.layout import KernelLayout, build_layout

RuntimeLayout = LaneLayout | KernelLayout


def build(
    codes: Tensor,
    levels: Tensor,
    group_size: int | None,
    sym: bool,
    dim: str = "oc",
    radix: bool = False,
) -> RuntimeLayout:
    """The runtime layout of one layer for the kernel this machine runs (arguments as
    :func:`baq.kernels.lanes.build_lanes`; ``radix``: the compact lane layout, ignored by the
    numba fallback, which has none)."""
    if native.library() is not None:
        return build_lanes(codes, levels, group_size, sym, dim, radix=radix)
    return build_layout(codes, levels, group_size, sym, dim)


def linear(
    layout: RuntimeLayout, x: Tensor, lo: Tensor, hi: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``F.linear(x, W, bias)`` by the kernel of ``layout`` (:func:`baq.kernels.native.linear`
    or :func:`baq.kernels.cpu.linear`)."""
    if isinstance(layout, LaneLayout):
        return native.linear(layout, x, lo, hi, bias)
    from baq.kernels import cpu  # numba, imported only where the fallback runs

    return cpu.linear(layout, x, lo, hi, bias)


__all__ = ["RuntimeLayout", "build", "linear"]

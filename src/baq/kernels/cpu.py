"""Fused unpack-and-multiply on the CPU for per-column mixed precision (issue 26).

``linear(layout, x, lo, hi, bias)`` computes ``F.linear(x, W, bias)`` for the weight ``W`` of a
packed layer (docs/FORMAT.md section 8) from its :class:`~baq.kernels.layout.KernelLayout`, without
building ``W``, for up to :data:`MAX_KERNEL_TOKENS` tokens (decoding and small batches); longer
inputs dequantize row tiles exactly and call torch's matmul, where BLAS beats any decode.

The algebra. Per OC, with ``span = hi - lo`` of row ``r`` and column group ``g``, the grid of
quant/grid.py gives ``W[r, j] = (q - z) * span / (L_j - 1)`` with the zero point
``z = round(-lo / step)`` of that row and *level count* (``L // 2`` when symmetric). So

    y[r] = sum_g span[r, g] * (sum_{j in g} xs[j] * q[r, j]  -  sum_{classes c of g} z[r, c] X[c])

with ``xs[j] = x[j] / (L_j - 1)`` and ``X[c]`` the sum of ``xs`` over the columns of class
``c = (g, L)``. The first sum is the streamed part (a dot product of codes with a vector that is
the same for every row), the second costs one zero point per (row, class), recomputed from the
ranges with the very float32 operations of quant/grid.py, so no per-weight float is stored and the
layout stays at the packed size. Per IC the step belongs to (row group, column): it is folded
into ``xs`` per row group, and the zero-point term is one number per (row group, token). The
result equals the dequantized ``F.linear`` up to float32 rounding: ``span * (x / (L - 1))``
instead of ``x * (span / (L - 1))``, and another summation order (the tests bound it).

The code sum runs over the part streams of the layout: per block of ``LANES`` bytes and slot
``i``, one shift and one mask of ``LANES`` consecutive bytes give ``LANES`` consecutive codes,
converted to float32 and multiplied into ``LANES`` float32 accumulators (``fastmath`` reassociation
and contraction are allowed there only, so LLVM vectorises the lane loop and fuses the
multiply-add; the zero points are computed without them). One output row per ``prange`` iteration:
rows are independent, so the result does not depend on the thread count.

Why numba (chosen, not measured against the alternatives): it needs no compiler on the user's
machine
(wheels for Linux, macOS and Windows; AQLM's CPU kernels use it), compiles for the host's vector
unit at first use (cached on disk: ``cache=True``), and its ``prange`` gives a thread pool whose
size follows ``torch.get_num_threads()`` (set at every call). ``torch.compile`` needs a C++
compiler at run time, which the README's two install commands do not provide; a C++ extension
would need one at install time or per-platform wheels.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from torch import Tensor

from baq.kernels.decode import (
    ROW_TILE,
    decode_rows,
    dot1,
    dot_tile,
    geometry,
    zero_point,
    zero_terms,
)
from baq.kernels.layout import LANES, PART_WIDTHS, KernelLayout, block_codes

# tokens up to which the fused kernel runs; longer inputs dequantize row tiles for torch's matmul
# (measured on 4096x14336 at 3 bits, 16 tokens, 2 threads: kernel 56 ms with 4-row tiles, 100 ms
# one row at a time, tiles 161 ms; float32 F.linear 26 ms)
MAX_KERNEL_TOKENS = 16
# rows per prange iteration of the fused kernel (a multiple of ROW_TILE): the scratch arrays are
# allocated once a chunk; 576 rows still give 36 chunks to balance over the threads
CHUNK_ROWS = 16
# rows per dequantized tile of the long-input path: 1024 x 14336 float32 is 59 MB
TILE_ROWS = 1024


@njit(cache=True)
def _prepare(x, perm, classes, counts, ic, lo, hi, sym, rgroups, xstart, xlen):
    """The scaled, permuted input of every part stream, and the zero-point sums.

    Returns:
        xs: (R, T, sum xlen) float32, part ``k``'s vector at ``base[k]``: per OC (``R = 1``)
        ``x[j] / (L_j - 1) * 2^offset``; per IC ``x[j] * step[gr, j] * 2^offset`` per row group.
        X: (T, K) float64 per OC: sum of ``x[j] / (L_j - 1)`` over each class.
        zterm: (R, T) float64 per IC: ``sum_j x[j] * step[gr, j] * zero[gr, j]``.
    """
    T = x.shape[0]
    K = classes.shape[0]
    base = np.zeros(4, np.int64)
    for k in range(1, 4):
        base[k] = base[k - 1] + xlen[k - 1]
    R = rgroups if ic else 1
    xs = np.zeros((R, T, base[3] + xlen[3]), np.float32)
    X = np.zeros((T, K), np.float64)
    zterm = np.zeros((R, T), np.float64)
    cur = np.zeros(4, np.int64)
    group = -1
    s = 0
    for c in range(K):
        g = classes[c, 0]
        L = classes[c, 1]
        if g != group:
            group = g
            for k in range(4):
                cur[k] = base[k] + xstart[k, g]
        w = 0
        while (1 << w) < L:
            w += 1
        inv = np.float32(1.0 / (L - 1))
        step = np.float32(0.0)
        z = np.float32(0.0)
        for s2 in range(s, s + classes[c, 2]):
            j = perm[s2]
            for gr in range(R):
                if ic:
                    step = (hi[gr, j] - lo[gr, j]) / np.float32(L - 1)
                    z = zero_point(lo[gr, j], hi[gr, j] - lo[gr, j], L, sym)
                for t in range(T):
                    if ic:
                        v = x[t, j] * step
                        zterm[gr, t] += np.float64(v) * np.float64(z)
                    else:
                        v = x[t, j] * inv
                        X[t, c] += v
                    # the parts of a w-bit code, widest first, as layout.parts_of
                    if w == 8:
                        xs[gr, t, cur[3]] = v
                    else:
                        off = 0
                        if w & 4:
                            xs[gr, t, cur[2]] = v * np.float32(1 << off)
                            off += 4
                        if w & 2:
                            xs[gr, t, cur[1]] = v * np.float32(1 << off)
                            off += 2
                        if w & 1:
                            xs[gr, t, cur[0]] = v * np.float32(1 << off)
            if w == 8:
                cur[3] += 1
            else:
                if w & 4:
                    cur[2] += 1
                if w & 2:
                    cur[1] += 1
                if w & 1:
                    cur[0] += 1
        s += classes[c, 2]
    return xs, X, zterm


@njit(parallel=True, cache=True)
def _kernel(S, tables, classes, lm1, ic, rsize, lo, hi, sym, xs, X, zterm, y):
    """``y[t, r]`` for every row, see the module docstring.

    ``prange`` runs over chunks of :data:`CHUNK_ROWS` rows, so the scratch arrays are allocated
    once a chunk (allocating them per row took most of a small layer's time); each row's result
    depends on that row alone, so not on the thread count.

    Args:
        S: the layout's streams; tables: from :func:`_static` (offsets, counts, geometry).
        classes: (K, 3) (group, L, count); lm1: (K,) ``L - 1`` in float32.
        ic: per-IC grid; rsize: rows per row group (per IC with groups; else 0).
        lo, hi: the ranges in float32; sym: symmetric grid.
        xs, X, zterm: from :func:`_prepare`.
        y: (T, rows) float32 output.
    """
    soff, counts, nrow, goff, xstart, base, cstart, bufn = tables
    T = xs.shape[1]
    rows = y.shape[1]
    ng = counts.shape[1]
    nchunk = (rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    for ch in prange(nchunk):
        r1 = min(rows, (ch + 1) * CHUNK_ROWS)
        out = np.empty((ROW_TILE, T), np.float64)
        zt = np.empty(T, np.float64)
        acc = np.empty((ROW_TILE, LANES), np.float32)
        accT = np.empty((ROW_TILE, T), np.float32)
        buf = np.empty((ROW_TILE, bufn), np.float32)
        rt = ch * CHUNK_ROWS
        while rt < r1:
            gr = rt // rsize if (ic and rsize > 0) else 0
            end = min(r1, rt + ROW_TILE)
            if ic and rsize > 0:
                end = min(end, (gr + 1) * rsize)  # a tile shares its row group's input
            nr = end - rt
            out[:] = 0.0
            for g in range(ng):
                acc[:] = 0.0
                accT[:] = 0.0
                for k in range(4):
                    # int64: an int32 count here made LLVM give up vectorising the dot (5x slower)
                    n = np.int64(counts[k, g])
                    if n == 0:
                        continue
                    xo = base[k] + xstart[k, g]
                    start = rt * nrow[k] + goff[k, g]
                    if T == 1:
                        for i in range(nr):
                            sv = start + i * nrow[k]
                            dot1(S, soff[k], 1 << k, sv, n, xs[gr, 0], xo, acc[i])
                    else:
                        dot_tile(S, soff[k], 1 << k, start, nrow[k], nr, n, xs[gr], xo, accT, buf)
                for i in range(nr):
                    r = rt + i
                    if T == 1:
                        accT[i, 0] = acc[i].sum()
                    if ic:
                        for t in range(T):
                            out[i, t] += np.float64(accT[i, t])
                    else:
                        lo_rg = lo[r, g]
                        span = hi[r, g] - lo[r, g]
                        zt[:] = 0.0
                        zero_terms(lo_rg, span, lm1, sym, cstart[g], cstart[g + 1], X, zt)
                        for t in range(T):
                            out[i, t] += np.float64(span) * (np.float64(accT[i, t]) - zt[t])
            for i in range(nr):
                for t in range(T):
                    v = out[i, t]
                    if ic:
                        v -= zterm[gr, t]
                    y[t, rt + i] = np.float32(v)
            rt = end


def _class_starts(layout: KernelLayout) -> np.ndarray:
    """(Gc + 1,) index of the first class of each column group (classes sorted by group)."""
    groups = layout.classes[:, 0].to(torch.int64)
    counts = torch.bincount(groups, minlength=layout.col_groups)
    return np.concatenate([[0], np.cumsum(counts.numpy())]).astype(np.int64)


def _row_group_size(layout: KernelLayout) -> int:
    return layout.group_size if (layout.dim == "ic" and layout.group_size is not None) else 0


def _ranges(layout: KernelLayout, lo: Tensor, hi: Tensor) -> tuple[np.ndarray, np.ndarray]:
    want = (layout.rows, layout.ngroups) if layout.dim == "oc" else (layout.ngroups, layout.cols)
    if tuple(lo.shape) != want or tuple(hi.shape) != want:
        raise ValueError(f"ranges of shape {tuple(lo.shape)}: expected {want}")
    if all(_plain_f32(t) for t in (lo, hi)):  # the usual case (PackedLinear keeps them so)
        return lo.numpy(), hi.numpy()
    return (
        lo.detach().to("cpu", torch.float32).contiguous().numpy(),
        hi.detach().to("cpu", torch.float32).contiguous().numpy(),
    )


def _plain_f32(t: Tensor) -> bool:
    return (
        t.dtype == torch.float32
        and t.device.type == "cpu"
        and not t.requires_grad
        and t.is_contiguous()
    )


def set_threads() -> None:
    """Size numba's pool as torch's (``torch.set_num_threads``), within numba's maximum."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def dequantize_rows(layout: KernelLayout, lo: Tensor, hi: Tensor, r0: int, r1: int) -> Tensor:
    """(r1 - r0, cols) float32 rows of ``W``, bitwise the weights of docs/FORMAT.md section 8."""
    lo_n, hi_n = _ranges(layout, lo, hi)
    out = np.zeros((r1 - r0, layout.cols), np.float32)
    set_threads()
    decode_rows(
        layout.streams.numpy(), layout.offsets.numpy(), layout.counts.numpy(),
        layout.perm.numpy(), layout.classes.numpy(), r0, r1, True, layout.dim == "ic",
        _row_group_size(layout), lo_n, hi_n, layout.sym, out,
    )  # fmt: skip
    return torch.from_numpy(out)


def linear(
    layout: KernelLayout,
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    bias: Tensor | None = None,
    max_tokens: int = MAX_KERNEL_TOKENS,
) -> Tensor:
    """``F.linear(x, W, bias)`` for the layer of ``layout`` with ranges ``lo``, ``hi``.

    Args:
        layout: the codes (:func:`baq.kernels.layout.build_layout`).
        x: (..., cols) input on the CPU, any float dtype (computed in float32).
        lo, hi: the grid ranges, (rows, G) per OC, (G, cols) per IC, float16 or float32.
        bias: (rows,) or None.
        max_tokens: up to this many tokens the fused kernel runs; beyond, row tiles of ``W`` are
            dequantized and multiplied by torch.
    Returns:
        (..., rows) in ``x.dtype``.
    """
    if x.shape[-1] != layout.cols:
        raise ValueError(f"input has {x.shape[-1]} features, the layer {layout.cols}")
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, layout.cols).to(torch.float32).contiguous()
    T = x2.shape[0]
    if T > max_tokens:
        parts = [
            F.linear(x2, dequantize_rows(layout, lo, hi, r0, min(r0 + TILE_ROWS, layout.rows)))
            for r0 in range(0, layout.rows, TILE_ROWS)
        ]
        y = torch.cat(parts, dim=1)
    else:
        y = torch.from_numpy(fused(layout, x2.numpy(), lo, hi))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*lead, layout.rows).to(x.dtype)


def _static(layout: KernelLayout) -> tuple:
    """The numpy views and tables every call needs, computed once per layout and kept on it (a
    small layer's product takes tens of microseconds: per-call conversions showed in its time).

    Returns:
        ``(S, perm, classes, counts, lm1, xstart, xlen, tables)``, ``tables`` the tuple
        :func:`_kernel` unpacks: stream offsets, per-group counts, codes per row, group offsets,
        segment starts in the input vector, part bases, first class of each group, and the decode
        buffer's length (a group's longest part segment plus a block at each end).
    """
    cached = getattr(layout, "_numpy", None)
    if cached is None:
        counts = layout.counts.numpy()
        nrow, goff, xstart, xlen = geometry(counts, layout.rows)
        base = np.concatenate([[0], np.cumsum(xlen)[:3]]).astype(np.int64)
        classes = layout.classes.numpy()
        lm1 = (classes[:, 1] - 1).astype(np.float32)
        pad = np.array([2 * block_codes(p) for p in PART_WIDTHS]).reshape(4, 1)
        bufn = int((counts + pad).max()) if counts.size else 0
        tables = (
            layout.offsets.numpy(), counts, nrow, goff, xstart, base,
            _class_starts(layout), bufn,
        )  # fmt: skip
        cached = (layout.streams.numpy(), layout.perm.numpy(), classes, counts, lm1, xstart,
                  xlen, tables)  # fmt: skip
        layout._numpy = cached
    return cached


def fused(layout: KernelLayout, x: np.ndarray, lo: Tensor, hi: Tensor) -> np.ndarray:
    """(T, rows) float32 ``x @ W^T`` by the fused kernel, ``x`` (T, cols) float32 contiguous."""
    lo_n, hi_n = _ranges(layout, lo, hi)
    S, perm, classes, counts, lm1, xstart, xlen, tables = _static(layout)
    ic = layout.dim == "ic"
    rgroups = layout.ngroups if ic else 1
    set_threads()
    xs, X, zterm = _prepare(
        x, perm, classes, counts, ic, lo_n, hi_n, layout.sym, rgroups, xstart, xlen
    )
    y = np.empty((x.shape[0], layout.rows), np.float32)
    rsize = _row_group_size(layout)
    _kernel(S, tables, classes, lm1, ic, rsize, lo_n, hi_n, layout.sym, xs, X, zterm, y)
    return y


__all__ = ["MAX_KERNEL_TOKENS", "PART_WIDTHS", "block_codes", "dequantize_rows", "linear"]

"""The numba building blocks of the CPU kernel (issue 26): decoding the part streams of
:mod:`baq.kernels.layout` and the dot products and zero points :mod:`baq.kernels.cpu` sums.

Every function here is compiled by numba (``cache=True``: once per machine, kept on disk). Only
the dot-product loops may reassociate (lane sums) and contract (FMA): ``fastmath`` there lets LLVM
vectorise the lane loop and fuse the multiply-add; the zero points are computed without it, with
the float32 operations of quant/grid.py, so they equal the saved grid's bit for bit.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from baq.kernels.layout import LANES

# only the dot-product loops may reassociate (lane sums) and contract (FMA)
_DOT_MATH = {"reassoc", "contract"}


@intrinsic
def field(typingctx, byte, shift, mask):
    """``float32((byte >> shift) & mask)`` computed on 8 bits.

    numba widens integer arithmetic to 64 bits, which made LLVM vectorise the decode on 8 lanes of
    int64 (``vcvtqq2ps``); on bytes it is a byte shift, a mask and a widening conversion.
    """
    sig = types.float32(types.uint8, types.uint8, types.uint8)

    def codegen(context, builder, signature, args):
        value = builder.and_(builder.lshr(args[0], args[1]), args[2])
        return builder.uitofp(value, ir.FloatType())

    return sig, codegen


@njit(fastmath=_DOT_MATH, cache=True)
def dot1(S, sbase, p, start, n, xs, xo, acc):
    """One token: ``acc[m] += xs[...] * code`` over the codes ``[start, start + n)`` of a stream.

    ``xs[xo + c]`` multiplies code ``start + c``; ``xs`` holds zeros for a block before ``xo`` and
    after ``xo + n``, so whole blocks are decoded across the segment's ends.
    """
    B = 8 * LANES // p
    cpb = 8 // p
    mask = np.uint8((1 << p) - 1)
    k0 = start // B
    k1 = (start + n + B - 1) // B
    for k in range(k0, k1):
        xb = xo + k * B - start
        sb = sbase + k * LANES
        # views, indexed from 0: a computed index could be negative as far as LLVM knows, and
        # numba's wraparound test on it stopped the vectoriser
        sv = S[sb : sb + LANES]
        for i in range(cpb):
            sh = np.uint8(p * i)
            xv = xs[xb + i * LANES : xb + (i + 1) * LANES]
            for m in range(LANES):
                acc[m] += xv[m] * field(sv[m], sh, mask)


@njit(fastmath=_DOT_MATH, cache=True)
def decode_segment(S, sbase, p, start, n, buf):
    """Codes ``[start, start + n)`` of a part stream as float32 into ``buf``, whole blocks from
    the one holding ``start``; returns where code ``start`` landed in ``buf``."""
    B = 8 * LANES // p
    cpb = 8 // p
    mask = np.uint8((1 << p) - 1)
    k0 = start // B
    k1 = (start + n + B - 1) // B
    for k in range(k0, k1):
        sv = S[sbase + k * LANES : sbase + (k + 1) * LANES]
        for i in range(cpb):
            sh = np.uint8(p * i)
            bv = buf[(k - k0) * B + i * LANES : (k - k0) * B + (i + 1) * LANES]
            for m in range(LANES):
                bv[m] = field(sv[m], sh, mask)
    return start - k0 * B


# rows multiplied together by the many-token path: each input vector loaded once serves ROW_TILE
# rows (the loads, not the multiply-adds, limited the one-row-at-a-time loop)
ROW_TILE = 4


@njit(fastmath=_DOT_MATH, cache=True)
def dot_tile(S, sbase, p, start, stride, nr, n, xs, xo, acc, buf):
    """:func:`dot1` for ``T`` tokens and up to :data:`ROW_TILE` rows: ``acc[i, t] += xs[t, xo:xo
    + n] . codes of row i`` for the rows whose segments start at ``start + i * stride``, ``i <
    nr``. Each row's segment is decoded once into ``buf[i]``, then one pass per token multiplies
    one input vector into four rows' codes (a row past ``nr`` repeats the last, its sums unused).
    """
    a0 = decode_segment(S, sbase, p, start, n, buf[0])
    a1 = decode_segment(S, sbase, p, start + stride * min(1, nr - 1), n, buf[1])
    a2 = decode_segment(S, sbase, p, start + stride * min(2, nr - 1), n, buf[2])
    a3 = decode_segment(S, sbase, p, start + stride * min(3, nr - 1), n, buf[3])
    b0 = buf[0, a0 : a0 + n]
    b1 = buf[1, a1 : a1 + n]
    b2 = buf[2, a2 : a2 + n]
    b3 = buf[3, a3 : a3 + n]
    for t in range(xs.shape[0]):
        xv = xs[t, xo : xo + n]
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for c in range(n):
            v = xv[c]
            s0 += v * b0[c]
            s1 += v * b1[c]
            s2 += v * b2[c]
            s3 += v * b3[c]
        acc[0, t] += s0
        acc[1, t] += s1
        acc[2, t] += s2
        acc[3, t] += s3


@njit(cache=True)
def zero_point(lo, span, levels, sym):
    """Zero point of quant/grid.py ``column_params`` in float32: ``round(-lo / step)``."""
    if sym:
        return np.float32(levels // 2)
    step = span / np.float32(levels - 1)
    return np.rint(-lo / step)


@njit(cache=True)
def zero_terms(lo, span, lm1, sym, c0, c1, X, zt):
    """``zt[t] += sum_c z_c * X[t, c]`` over the classes ``[c0, c1)`` of a row's column group,
    ``z_c`` the zero point of :func:`zero_point` (``lm1``: ``L_c - 1`` in float32 per class). A loop
    of its own over contiguous arrays, which LLVM vectorises (the division and the rounding)."""
    T = zt.shape[0]
    if T == 1:
        s = 0.0
        for c in range(c0, c1):
            if sym:
                z = np.floor((lm1[c] + np.float32(1.0)) * np.float32(0.5))
            else:
                z = np.rint(-lo / (span / lm1[c]))
            s += np.float64(z) * X[0, c]
        zt[0] += s
        return
    for c in range(c0, c1):
        if sym:
            z = np.floor((lm1[c] + np.float32(1.0)) * np.float32(0.5))
        else:
            z = np.rint(-lo / (span / lm1[c]))
        for t in range(T):
            zt[t] += np.float64(z) * X[t, c]


@njit(cache=True)
def geometry(counts, rows):
    """Per part stream: codes per row, offset of each column group in a row, start of each
    group's segment in the padded input vector, and that vector's length (per part)."""
    ng = counts.shape[1]
    nrow = np.zeros(4, np.int64)
    goff = np.zeros((4, ng), np.int64)
    xstart = np.zeros((4, ng), np.int64)
    xlen = np.zeros(4, np.int64)
    for k in range(4):
        B = 8 * LANES // (1 << k)
        at = B
        off = 0
        for g in range(ng):
            goff[k, g] = off
            xstart[k, g] = at
            off += counts[k, g]
            at += counts[k, g] + B
        nrow[k] = off
        xlen[k] = at
    return nrow, goff, xstart, xlen


@njit(cache=True)
def code_at(S, sbase, p, gi):
    """Code number ``gi`` of a part stream (scalar decode, for unpacking and tiles)."""
    B = 8 * LANES // p
    k = gi // B
    rem = gi - k * B
    i = rem // LANES
    m = rem - i * LANES
    return (np.int64(S[sbase + k * LANES + m]) >> (p * i)) & ((1 << p) - 1)


@njit(parallel=True, cache=True)
def decode_rows(S, soff, counts, perm, classes, r0, r1, dequant, ic, rsize, lo, hi, sym, out):
    """Rows ``[r0, r1)`` in the original column order into float32 ``out``: the codes
    (``dequant`` false; at most 255, exact in float32) or the weights of docs/FORMAT.md
    section 8, bit for bit."""
    rows = -1
    nrow, goff, _, _ = geometry(counts, rows)
    K = classes.shape[0]
    for r in prange(r0, r1):
        gr = r // rsize if (ic and rsize > 0) else 0
        cur = np.zeros(4, np.int64)
        group = -1
        s = 0
        for c in range(K):
            g = classes[c, 0]
            L = classes[c, 1]
            if g != group:
                group = g
                for k in range(4):
                    cur[k] = r * nrow[k] + goff[k, g]
            w = 0
            while (1 << w) < L:
                w += 1
            for s2 in range(s, s + classes[c, 2]):
                j = perm[s2]
                if w == 8:
                    q = code_at(S, soff[3], 8, cur[3])
                    cur[3] += 1
                else:
                    q = 0
                    off = 0
                    if w & 4:
                        q |= code_at(S, soff[2], 4, cur[2]) << off
                        cur[2] += 1
                        off += 4
                    if w & 2:
                        q |= code_at(S, soff[1], 2, cur[1]) << off
                        cur[1] += 1
                        off += 2
                    if w & 1:
                        q |= code_at(S, soff[0], 1, cur[0]) << off
                        cur[0] += 1
                if dequant:
                    if ic:
                        lo_v = lo[gr, j]
                        span = hi[gr, j] - lo[gr, j]
                    else:
                        lo_v = lo[r, g]
                        span = hi[r, g] - lo[r, g]
                    step = span / np.float32(L - 1)
                    z = zero_point(lo_v, span, L, sym)
                    out[r - r0, j] = (np.float32(q) - z) * step
                else:
                    out[r - r0, j] = np.float32(q)
            s += classes[c, 2]

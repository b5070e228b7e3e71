"""The native CPU kernel of packed linears (issue 26): lane fields, C++, compiled at first use.

``linear(layout, x, lo, hi, bias)`` computes ``F.linear(x, W, bias)`` for the weight ``W`` of a
packed layer (docs/FORMAT.md section 8) from its :class:`~baq.kernels.lanes.LaneLayout` without
building ``W``: up to :data:`MAX_KERNEL_TOKENS` tokens fused (decoding, batches, short prompts);
longer inputs dequantize row tiles exactly (the same C++) and call torch's matmul.

The algebra is that of :mod:`baq.kernels.cpu` (its docstring): per OC, ``y[r] = sum_g span[r, g]
* (sum_j xs[j] q[r, j] - sum_c z[r, c] X[c])`` with ``xs[j] = x[j] / (L_j - 1)`` computed once
per token, so the streamed part is a product of integer codes with one float vector for every
row, and the zero points ``z`` (one per row and class) are recomputed from the ranges with the
float32 operations of quant/grid.py. lanes.cpp rebuilds 16 codes at a time as float32 from their
lane fields (AVX512: a shift and a ``vpermps`` from a 16-entry table for widths up to 4, a shift,
a mask and a conversion above) and multiplies them by 16 inputs with one FMA per token. The codes
are exact, so the result differs from the dequantized float64 product by float32 sums alone
(tests/kernels bound it). The input is never quantized (an int8 ``x`` with integer dot products,
llama.cpp's way, would not be exact).

Why C++ and not numba (measured, docs/DESIGN.md "Kernels"): on 4096x14336 at 3 bits, one token,
numba's best (part streams decoded by shifts, LLVM-vectorised) was no faster than float32
``F.linear`` (7.2 ms against 6.8, two threads), and its thread pool competed with torch's. The
C++ decodes a chunk in 2 to 3 vector instructions with the accumulators in registers, about 3
times faster than float32 ``F.linear`` there in CPU time, and runs on torch's own OpenMP pool
through ``at::parallel_for`` (so ``torch.set_num_threads`` applies and no second pool exists).
With AVX2 and FMA but no AVX512 (most x86 CPUs, this project's session-18 machine among them)
the same 16-lane loops run on pairs of 256-bit vectors (lanes.cpp maps each AVX512 intrinsic it
calls onto two AVX2 ones; codes decode by a mask and a conversion): 7 to 11x faster than
the plain loops there, 1.8x faster than float32 ``F.linear`` on 4096x14336 at one token. Without
either, the loops are plain C++ that the compiler vectorises as it can (``-DBAQ_PORTABLE``
builds them everywhere, for the tests).

Compilation: ``torch.utils.cpp_extension.load`` (g++ and ninja; ``-O3 -march=native -fopenmp``)
at the first use on a machine, cached in torch's extensions folder under a name hashed from the
source, the flags and the processor, so later processes load it in well under a second. Where no
compiler (or ninja) exists the load fails once, is logged at INFO, and :mod:`baq.kernels.runtime`
uses the numba kernel of :mod:`baq.kernels.cpu` instead. The C functions are called by ctypes
(no pybind: the source includes ``ATen/Parallel.h`` only and compiles in seconds).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import platform
from pathlib import Path

import torch
from torch import Tensor

from baq.kernels.lanes import LaneLayout
from baq.kernels.row_lanes import RowLaneLayout

NativeLayout = LaneLayout | RowLaneLayout

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lanes.cpp")
# tokens up to which the fused kernel runs; beyond, dequantized row tiles go to torch's matmul
# (4096x14336, 3 bits, one thread, CPU time: fused 157 ms against tiles 259 at 64 tokens, 725
# against 414 at 256; float32 F.linear 83 and 224)
MAX_KERNEL_TOKENS = 128
# rows per dequantized tile of the long-input path: 1024 x 14336 float32 is 59 MB
TILE_ROWS = 1024
FLAGS = ["-O3", "-march=native", "-fopenmp"]

_LIBS: dict[bool, ctypes.CDLL | None] = {}


class _Layout(ctypes.Structure):
    """lanes.cpp's ``struct Layout``: pointers into a LaneLayout's tensors and its sizes."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in
          ("words", "chunk_word", "chunk_shift", "runs", "grun", "slot_col", "slot_lm1",
           "classes", "gclass")),
        *((name, ctypes.c_int64) for name in
          ("rows", "cols", "rowwords", "nslots", "ngc", "K", "ic", "sym", "rsize", "nrg")),
        # the shared tails last (lanes.cpp: older kernels read the prefix)
        ("tail", ctypes.c_void_p), ("tail_parts", ctypes.c_void_p),
        ("ktail", ctypes.c_int64), ("nparts", ctypes.c_int64),
    ]  # fmt: skip


class _RowLayout(ctypes.Structure):
    """lanes.cpp's ``struct RowLayout``: pointers into a RowLaneLayout's tensors and its sizes."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in
          ("words", "segs", "gseg", "slot_col", "classes", "gclass")),
        *((name, ctypes.c_int64) for name in
          ("rows", "cols", "nwords", "nslots", "nseg", "ngc", "K", "ic", "sym", "rsize", "nrg",
           "col16")),
    ]  # fmt: skip


def library(portable: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel (built at the first call on this machine, then cached on disk), or
    None where it cannot be built (logged once). ``portable``: the plain-loop variant that the
    compiler vectorises, also used on machines without AVX512 (tests build it explicitly)."""
    if portable not in _LIBS:
        try:
            _LIBS[portable] = _compile(portable)
        except Exception as err:  # no compiler, no ninja, a failed build: all mean numba
            first = str(err).strip().splitlines()[:1] or [type(err).__name__]
            log.info("native kernel not available (%s): cache 'kernel' uses numba", first[0])
            _LIBS[portable] = None
    return _LIBS[portable]


def vector_bits(lib: ctypes.CDLL | None = None) -> int:
    """The vector loops ``lib`` (default :func:`library`) runs: 512 (AVX512), 256 (AVX2 and FMA,
    the 16-lane loops on pairs of 256-bit vectors) or 0 (the portable loops, or no library)."""
    lib = library() if lib is None else lib
    return int(lib.baq_lanes_isa()) if lib is not None else 0


def _compile(portable: bool) -> ctypes.CDLL:
    flags = FLAGS + (["-DBAQ_PORTABLE"] if portable else [])
    return load_source(SOURCE, flags, SOURCE.read_bytes())


def load_source(source: Path, flags: list[str], key: bytes) -> ctypes.CDLL:
    """Compile ``source`` (lanes.cpp, or a file including it) once per ``key``, flags and
    processor, and declare the C functions: the library :func:`library` returns."""
    from torch.utils.cpp_extension import load

    key += " ".join(flags).encode() + _cpu_signature().encode()
    name = "baq_lanes_" + hashlib.sha1(key).hexdigest()[:12]
    log.info("loading the native kernel %s (compiled once per machine: seconds)", name)
    path = load(name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                is_python_module=False, verbose=False)  # fmt: skip
    lib = ctypes.CDLL(str(path))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.baq_lanes_linear.argtypes = [ptr, ptr, ptr, ctypes.c_int, ptr, i64, ptr, ptr]
    lib.baq_lanes_linear.restype = ctypes.c_int
    lib.baq_lanes_dequantize.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.baq_lanes_dequantize.restype = None
    lib.baq_lanes_isa.restype = ctypes.c_int
    lib.baq_rows_linear.argtypes = [ptr, ptr, ptr, ctypes.c_int, ptr, i64, ptr, ptr]
    lib.baq_rows_linear.restype = ctypes.c_int
    lib.baq_rows_dequantize.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.baq_rows_dequantize.restype = None
    lib.baq_rotate.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr]
    lib.baq_rotate.restype = None
    return lib


def _cpu_signature() -> str:
    """The processor's model and flags: -march=native code must not meet another processor
    through a shared extensions folder."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return platform.machine() + "|".join(lines)
    except OSError:
        return platform.machine() + platform.processor()


def _struct(layout: NativeLayout) -> _Layout | _RowLayout:
    """The C view of a layout, made once and kept on it (its tensors stay alive with it)."""
    cached = getattr(layout, "_c", None)
    ic = layout.dim == "ic"
    rsize = layout.group_size if (ic and layout.group_size is not None) else 0
    if cached is None and isinstance(layout, RowLaneLayout):
        cached = _RowLayout(
            *(t.data_ptr() for t in layout.tensors()), layout.rows, layout.cols,
            int(layout.words.shape[1]), int(layout.slot_col.numel()), int(layout.segs.shape[0]),
            layout.col_groups, int(layout.classes.shape[0]), int(ic), int(layout.sym), rsize,
            layout.ngroups if ic else 1, int(layout.slot_col.dtype == torch.int16),
        )  # fmt: skip
        layout._c = cached
    if cached is None:
        words, tail, parts, *tables = (t.data_ptr() for t in layout.tensors())
        cached = _Layout(
            words, *tables, layout.rows, layout.cols, int(layout.words.shape[1]),
            int(layout.slot_col.numel()), layout.col_groups, int(layout.classes.shape[0]),
            int(ic), int(layout.sym), rsize, layout.ngroups if ic else 1,
            tail, parts, layout.tail_chunk, int(layout.tail_parts.shape[0]),
        )  # fmt: skip
        layout._c = cached
    return cached


def _ranges(
    layout: NativeLayout, lo: Tensor, hi: Tensor, kept: tuple[torch.dtype, ...] = (torch.float32,)
) -> tuple[Tensor, Tensor]:
    """The ranges as the C functions read them: CPU, contiguous, in a dtype of ``kept`` as they
    are (both the same), else converted to float32."""
    want = (layout.rows, layout.ngroups) if layout.dim == "oc" else (layout.ngroups, layout.cols)
    if tuple(lo.shape) != want or tuple(hi.shape) != want:
        raise ValueError(f"ranges of shape {tuple(lo.shape)}: expected {want}")
    if lo.dtype in kept and _ready(lo, lo.dtype) and _ready(hi, lo.dtype):  # the usual case
        return lo, hi  # without four dispatches a tensor
    return tuple(t.detach().to("cpu", torch.float32).contiguous() for t in (lo, hi))


def _ready(t: Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """``t`` is what the C functions read as it is: ``dtype``, on the CPU, contiguous."""
    return t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()


def dequantize_rows(
    layout: NativeLayout, lo: Tensor, hi: Tensor, r0: int, r1: int, lib: ctypes.CDLL | None = None
) -> Tensor:
    """(r1 - r0, cols) float32 rows of ``W``, bitwise the weights of docs/FORMAT.md section 8."""
    lib = lib or _require()
    lo, hi = _ranges(layout, lo, hi)
    out = torch.zeros(r1 - r0, layout.cols)
    rows = isinstance(layout, RowLaneLayout)
    (lib.baq_rows_dequantize if rows else lib.baq_lanes_dequantize)(
        ctypes.byref(_struct(layout)), lo.data_ptr(), hi.data_ptr(), r0, r1, out.data_ptr()
    )
    return out


def linear(
    layout: NativeLayout,
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    bias: Tensor | None = None,
    max_tokens: int = MAX_KERNEL_TOKENS,
    lib: ctypes.CDLL | None = None,
) -> Tensor:
    """``F.linear(x, W, bias)`` for the layer of ``layout`` with ranges ``lo``, ``hi``.

    Args:
        layout: the codes (:func:`baq.kernels.lanes.build_lanes` or
            :func:`baq.kernels.row_lanes.build_row_lanes`).
        x: (..., cols) input on the CPU, any float dtype (computed in float32; past
            ``max_tokens`` a bfloat16 or float16 input multiplies the rounded weight in its
            own dtype, as ``F.linear`` with ``cache="weight"``).
        lo, hi: the grid ranges, (rows, G) per OC, (G, cols) per IC; float16 ones on the CPU
            are read as they are (widened in the kernel), others converted to float32.
        bias: (rows,) or None.
        max_tokens: up to this many tokens the fused kernel runs; beyond, row tiles of ``W``
            are dequantized and multiplied by torch.
        lib: the compiled library (default :func:`library`; tests pass the portable one).
    Returns:
        (..., rows) in ``x.dtype``.
    """
    lib = lib or _require()
    if x.shape[-1] != layout.cols:
        raise ValueError(f"input has {x.shape[-1]} features, the layer {layout.cols}")
    lead = x.shape[:-1]
    T = x.numel() // layout.cols
    b = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()
    if T > max_tokens:
        # one dequantized tile at a time (the layer's float weight never exists whole), in the
        # input's dtype: a bfloat16 model multiplies as cache="weight" does, and a long prompt
        # in bfloat16 runs at its BLAS speed (about 4x float32's on this project's machine)
        wide = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        xs = x.detach().reshape(-1, layout.cols).to(wide).contiguous()
        y = torch.empty(T, layout.rows, dtype=wide)
        for r0 in range(0, layout.rows, TILE_ROWS):
            r1 = min(r0 + TILE_ROWS, layout.rows)
            W = dequantize_rows(layout, lo, hi, r0, r1, lib).to(wide)
            torch.mm(xs, W.t(), out=y[:, r0:r1])
        if b is not None:
            y += b.to(wide)
    else:
        x2 = x.reshape(-1, layout.cols)
        if not _ready(x2):
            x2 = x2.detach().to("cpu", torch.float32).contiguous()
        # float16 ranges (a layer saved so) go as they are: the kernel widens them
        lo, hi = _ranges(layout, lo, hi, kept=(torch.float32, torch.float16))
        half = lo.dtype == torch.float16
        y = torch.empty(T, layout.rows)
        rows = isinstance(layout, RowLaneLayout)
        rc = (lib.baq_rows_linear if rows else lib.baq_lanes_linear)(
            ctypes.byref(_struct(layout)), lo.data_ptr(), hi.data_ptr(), int(half),
            x2.data_ptr(), T, None if b is None else b.data_ptr(), y.data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError(f"native kernel: no memory for the {T}x{layout.cols} input")
    y = y.view(*lead, layout.rows)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def rotate(x: Tensor, signs: Tensor, hh: Tensor | None, lib: ctypes.CDLL | None = None) -> Tensor:
    """``R x`` along the last dimension of a float32 CPU ``x`` for the rotation of
    :class:`baq.quant.rotation.HadamardRotation` (``signs``: its float32 signs; ``hh``: its
    float32 ``(h, h)`` Paley factor, None for a power of two), in one C call: torch's blocked
    transform dispatches a dozen small operators a call, 87-193 us a token on the reference
    model, more than the layer's product (session 20). Not differentiable: autograd's callers
    take torch's transform."""
    lib = lib or _require()
    n = x.shape[-1]
    h = 1 if hh is None else int(hh.shape[0])
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    lib.baq_rotate(
        x2.data_ptr(), x2.shape[0], n, h, signs.data_ptr(),
        None if hh is None else hh.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y.view(x.shape)


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernel is not available here: use baq.kernels.cpu")
    return lib


__all__ = ["MAX_KERNEL_TOKENS", "dequantize_rows", "library", "linear"]

"""What loading a saved folder will take in memory, from its headers alone, and the admission.

A saved folder is untrusted (docs/SECURITY.md): its size on disk says little about what it asks
for. A column with one level stores no bytes, yet the ``"codes"`` cache keeps a byte for each of
its weights, and an input embedding tied to a packed head is dequantized at once, so an 80 KB
folder claiming a large vocabulary asked for 4.4 GiB (issue 29, defect 4). Before anything is
allocated, :func:`estimate_load` adds up, from the safetensors headers and the ``layers``
metadata, every part a load holds (the list in :class:`LoadEstimate`), and :func:`admit_load`
refuses a load that needs more than the available memory, in one line naming the folder and the
fix. The shapes were checked against config.json first (loading.check_folder), so the config's
vocabulary and hidden size are what the header shapes say.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from baq.saved.headers import HeaderInfo, StorageError

# peak bytes per weight while one layer is unpacked (int64 codes, their sorted copy, the float32
# weight; measured 32-40 for every cache on a 4096 x 4096 layer): the largest layer's is added once
TRANSIENT_BYTES_PER_WEIGHT = 40
# the kernel layout against the stored code streams (1.09 to 1.12 measured, kernels/layout.py)
KERNEL_LAYOUT_RATIO = 1.15
# level counts the int8 offsets of the "codes" cache and the kernel layout hold
CODES_INT8_LEVELS, KERNEL_LEVELS = 128, 256
# safetensors dtype names -> bytes per element
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
FLOATS = {"F64", "F32", "F16", "BF16"}
_CODES = re.compile(r"^(.*)\.codes\.(\d+)$")
GIB = 1 << 30


@dataclass(frozen=True)
class LoadEstimate:
    """Bytes a load holds, by part.

    Attributes:
        dense: the unquantized tensors (stored bytes; plus their copy in ``dtype`` when cast).
        packed: the packed layers' stored tensors (a rotation's seed aside: it is not kept).
        cache: what the layers' cache keeps once each has run (``"codes"``: a byte per weight,
            two above 128 levels; ``"weight"``: the float weight; ``"kernel"``: the layout),
            and a rotated layer's float32 signs (every cache but ``"weight"``).
        tied: float weights of tensors tied to packed layers (a tied input embedding).
        transient: the largest layer while it is unpacked.
    """

    dense: int
    packed: int
    cache: int
    tied: int
    transient: int

    @property
    def total(self) -> int:
        return self.dense + self.packed + self.cache + self.tied + self.transient

    def describe(self) -> str:
        parts = {"dense": self.dense, "packed": self.packed, "cache": self.cache,
                 "tied": self.tied, "unpacking": self.transient}  # fmt: skip
        return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)


def layer_tensors(info: HeaderInfo, layers: dict[str, dict]) -> dict[str, dict[str, tuple]]:
    """Layer name -> its tensors' header entries (``N.codes.<L>``, ``N.lo``, ...)."""
    out: dict[str, dict[str, tuple]] = defaultdict(dict)
    for key, entry in info.items():
        match = _CODES.match(key)
        name = match.group(1) if match else key.rpartition(".")[0]
        if name in layers:
            out[name][key] = entry
    return out


def estimate_load(
    layers: dict[str, dict],
    qinfo: HeaderInfo,
    dense_info: HeaderInfo,
    tied: dict[str, str],
    cache: str,
    itemsize: int | None = None,
) -> LoadEstimate:
    """What loading a folder with cache ``cache`` holds at its peak, from headers alone.

    Args:
        layers: the ``layers`` metadata of the quantized files (headers.packed_layers).
        qinfo, dense_info: tensor name -> (dtype, shape, nbytes) of the quantized and the dense
            files (headers.merged_info).
        tied: the manifest's aliases.
        cache: the PackedLinear cache.
        itemsize: bytes per element of the load's float dtype (None: as stored; float32 for
            the dequantized weights).
    Returns:
        The :class:`LoadEstimate`.
    """
    dense = 0
    for dtype, shape, nbytes in dense_info.values():
        dense += nbytes
        if itemsize is not None and dtype in FLOATS and ITEMSIZE[dtype] != itemsize:
            dense += _numel(shape) * itemsize  # the cast copy, held with the original
    by_layer = layer_tensors(qinfo, layers)
    packed = cache_bytes = transient = 0
    for name, m in layers.items():
        rows, cols = m["shape"]
        tensors = by_layer.get(name, {})
        # the rotation's seed is read, not kept; the layer keeps its float32 signs instead once
        # it has run (every cache but "weight", whose weight is in the original basis)
        rotated = f"{name}.rotation" in tensors
        packed += sum(e[2] for k, e in tensors.items() if k != f"{name}.rotation")
        code_bytes = sum(e[2] for k, e in tensors.items() if _CODES.match(k))
        top = max((int(_CODES.match(k).group(2)) for k in tensors if _CODES.match(k)), default=1)
        ranges = _numel(tensors.get(f"{name}.lo", ("F32", [0], 0))[1])
        codes = rows * cols * (1 if top <= CODES_INT8_LEVELS else 2) + 4 * (ranges + cols)
        per_cache = {
            "none": 0,
            "codes": codes,
            "weight": rows * cols * (itemsize or 4),
            "kernel": codes
            if top > KERNEL_LEVELS
            else int(KERNEL_LAYOUT_RATIO * code_bytes) + 8 * cols,  # + the slot tables
        }
        # at most the kernel's: an upper bound
        per_cache["compact"] = per_cache["lanes"] = per_cache["kernel"]
        cache_bytes += per_cache[cache] + (4 * cols if rotated and cache != "weight" else 0)
        transient = max(transient, rows * cols * TRANSIENT_BYTES_PER_WEIGHT)
    tied_bytes = 0
    for stored in tied.values():
        owner = stored.removesuffix(".weight")
        if stored.endswith(".weight") and owner in layers:
            rows, cols = layers[owner]["shape"]
            tied_bytes += rows * cols * (itemsize or 4)
    return LoadEstimate(dense, packed, cache_bytes, tied_bytes, transient)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def available_bytes() -> int:
    """Memory this process may still allocate: ``psutil``'s available memory."""
    import psutil

    return int(psutil.virtual_memory().available)


def admit_load(root: Path, estimates: dict[str, LoadEstimate], cache: str) -> None:
    """Refuse a load whose estimate exceeds the available memory, before anything is allocated.

    Args:
        root: the folder (named in the message).
        estimates: cache -> :func:`estimate_load` of that cache (``cache`` among them).
        cache: the cache the load asked for.
    Raises:
        StorageError: one line with the estimate, the available memory and the fix.
    """
    available = available_bytes()
    need = estimates[cache]
    if need.total <= available:
        return
    fits = [c for c, e in estimates.items() if c != cache and e.total <= available]
    fix = (
        f"load it with another cache ({', '.join(f'--cache {c}' for c in fits)}) or on a "
        "machine with more memory"
        if fits
        else "load it on a machine with more memory, or check that the folder is what it claims"
    )
    raise StorageError(
        f"{root}: loading with cache {cache!r} needs about {need.total / GIB:.2f} GiB "
        f"({need.describe()}), {available / GIB:.2f} GiB is available: {fix}"
    )


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Building a layer's run-time cache unpacks its codes to int64 (8 bytes a weight) and frees
    them; glibc keeps such freed blocks in the process (its mmap threshold grows after the first
    large free, so later ones come from the heap), and the loaded 3-bit reference model stayed at
    918 MB of RSS after its first forward where 649 MB were live (session 21). Called after each
    build: 0.3 ms when there is nothing to return."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

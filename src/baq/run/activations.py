"""Calibration activations that may not fit in memory: in RAM under a budget, else on disk.

The pipeline passes (nsamples, seqlen, hidden) hidden states from block to block. An
:class:`ActivationStore` holds such an array in a CPU tensor when its size is within
``max_bytes``, else in a raw file in a temporary folder that is removed on ``close`` (or when
the store is garbage collected, or at interpreter exit). Reads return CPU tensors that are
copies, writes cast to the store's dtype, so both backends behave identically.

The file is read and written with positional I/O rather than memory-mapped: pages of a mapped
file count in the process's resident set (a 400 MB ``torch.from_file(shared=True)`` array grew
``ru_maxrss`` by 450 MB in a test), while explicit reads keep only the batch being processed in
the process and leave caching to the kernel's page cache, which it can always reclaim. The file
is a plain C-order array (bfloat16 as its raw bits), which ``numpy.memmap`` can open if wanted.
"""

from __future__ import annotations

import operator
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 too: the pipeline keeps every model's hidden states in a store, and a model may run in
# double precision (analyses, reference runs); it is not a dtype calibration usually needs
_ACCEPTED = (*DTYPES, torch.float64)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": 2**30,
    "gb": 10**9,
    "gib": 2**30,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNLIMITED = ("none", "inf", "unlimited")

_CHUNK = 1 << 26  # bytes per read/write call (64 MiB)


def parse_size(text: str | int | None) -> int | None:
    """Parse a memory size such as ``"2GiB"``, ``"500MB"``, ``"1.5G"``, ``"0"`` into bytes.

    Units are case-insensitive: ``KB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/
    ``GiB``/``TiB`` and the bare ``K``/``M``/``G``/``T`` powers of 1024, ``B`` or no unit
    bytes. ``none``, ``inf``, ``unlimited`` (and None) mean no limit and give None. Ints pass
    through. Meant as an argparse ``type=``.

    Raises:
        ValueError: not a size.
    """
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"size {text!r} is not a string")
    if text.strip().lower() in _UNLIMITED:
        return None
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"size {text!r}: use a number with an optional unit such as 0, 500MB, 2GiB, 1.5G, "
            "or none"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: a size for log messages."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _cleanup(fd: int, folder: str) -> None:
    try:
        os.close(fd)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ActivationStore:
    """A (n, *row_shape) CPU array in RAM, or in a temporary file when it exceeds ``max_bytes``.

    Indexing follows tensors along the first axis: ``store[s:e]`` (step 1 only) and
    ``store[i]`` read copies; ``store[s:e] = t`` writes, casting ``t`` to the store's dtype
    (``t`` may live on any device). ``len(store)``, ``store.shape``, ``store.dtype`` and
    ``store.nbytes`` work as for a tensor. A new store's contents are undefined, as with
    ``torch.empty``.

    The budget is per store: a block forward that reads one store and writes another
    (``empty_like``) holds up to twice ``max_bytes`` in RAM.

    Args:
        shape: full shape, e.g. (nsamples, seqlen, hidden).
        dtype: float32, bfloat16, float16 (or float64).
        max_bytes: budget of RAM for this store; None means unlimited. A store of more bytes
            goes to disk (so 0 always spills, except an empty store).
        dir: folder for the spill file's temporary folder (default: the system's temp dir).
    """

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        max_bytes: int | None = None,
        dir: str | os.PathLike | None = None,
    ) -> None:
        if dtype not in _ACCEPTED:
            raise ValueError(
                f"dtype {dtype}: an activation store holds float32, bfloat16, float16, float64"
            )
        self.shape = torch.Size(int(s) for s in shape)
        if len(self.shape) < 1 or any(s < 0 for s in self.shape):
            raise ValueError(f"shape {tuple(self.shape)}: need at least one non-negative size")
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.dir = dir
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self._row_bytes = self.shape[1:].numel() * self._itemsize
        self.nbytes = self.shape.numel() * self._itemsize
        self._ram: Tensor | None = None
        self._fd: int | None = None
        self._folder: str | None = None
        self.path: Path | None = None
        self._cursor = 0
        self._closed = False
        if max_bytes is None or self.nbytes <= max_bytes:
            self._ram = torch.empty(self.shape, dtype=dtype)
        else:
            self._folder = tempfile.mkdtemp(prefix="baq-activations-", dir=dir)
            self.path = Path(self._folder) / "activations.bin"
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            try:
                self._fd = os.open(self.path, flags, 0o600)
            except OSError:
                shutil.rmtree(self._folder, ignore_errors=True)
                raise
            # closes the file and removes the folder on close(), garbage collection or exit
            self._finalizer = weakref.finalize(self, _cleanup, self._fd, self._folder)
            os.ftruncate(self._fd, self.nbytes)

    # ----- construction helpers

    @classmethod
    def from_tensors(
        cls,
        tensors: Iterable[Tensor],
        max_bytes: int | None = None,
        dir: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
    ) -> ActivationStore:
        """Concatenate tensors along the first axis into a new store.

        Each tensor is (k_j, *row_shape), e.g. the (1, seqlen, hidden) list of
        ``baq.model.blocks.capture_block_inputs``; a single tensor is one such block of rows.
        ``dtype`` defaults to the first tensor's. A sequence is written one tensor at a time
        (no concatenated copy in RAM); a one-shot iterable is listed first.
        """
        if isinstance(tensors, Tensor):
            items: Sequence[Tensor] = [tensors]
        else:
            items = tensors if isinstance(tensors, Sequence) else list(tensors)
        if not items:
            raise ValueError("from_tensors needs at least one tensor")
        row = tuple(items[0].shape[1:])
        for t in items:
            if tuple(t.shape[1:]) != row:
                raise ValueError(f"tensor of shape {tuple(t.shape)} does not match rows {row}")
        n = sum(int(t.shape[0]) for t in items)
        store = cls((n, *row), dtype or items[0].dtype, max_bytes, dir)
        for t in items:
            store.append(t)
        return store

    def empty_like(self) -> ActivationStore:
        """A new store of the same shape, dtype, budget and spill folder (e.g. for outputs)."""
        return ActivationStore(self.shape, self.dtype, self.max_bytes, self.dir)

    def append(self, tensor: Tensor) -> None:
        """Write ``tensor`` (k, *row_shape) at the append cursor (0 for a new store), advance it.

        Lets a capture loop fill a store sample by sample without holding all samples.
        """
        k = int(tensor.shape[0]) if tensor.dim() == len(self.shape) else -1
        if k < 0 or self._cursor + k > len(self):
            raise ValueError(
                f"cannot append a tensor of shape {tuple(tensor.shape)} at row {self._cursor} "
                f"of a store of shape {tuple(self.shape)}"
            )
        self[self._cursor : self._cursor + k] = tensor
        self._cursor += k

    @property
    def filled(self) -> int:
        """Rows written by ``append`` so far."""
        return self._cursor

    # ----- tensor-like access

    @property
    def spilled(self) -> bool:
        """True when the data lives in a file on disk."""
        return self._ram is None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = f"spilled to {self.path}" if self.spilled else "in RAM"
        state = ", closed" if self._closed else ""
        return (
            f"ActivationStore(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"{format_size(self.nbytes)} {where}{state})"
        )

    def _rows(self, index: int | slice) -> tuple[int, int, bool]:
        """``(start, stop, squeeze)`` of an index along the first axis."""
        if self._closed:
            raise ValueError("the activation store is closed")
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise IndexError("an activation store only takes slices with step 1")
            return start, max(start, stop), False
        try:
            i = operator.index(index)
        except TypeError:
            raise IndexError(
                f"an activation store takes an int or a slice, not {type(index).__name__}"
            ) from None
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} rows")
        i %= n
        return i, i + 1, True

    def __getitem__(self, index: int | slice) -> Tensor:
        start, stop, squeeze = self._rows(index)
        if self._ram is not None:
            out = self._ram[start:stop].clone()
        else:
            out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
            self._io(start, out, write=False)
        return out[0] if squeeze else out

    def __setitem__(self, index: int | slice, value: Tensor) -> None:
        start, stop, squeeze = self._rows(index)
        want = (stop - start, *self.shape[1:])
        value = torch.as_tensor(value)
        if squeeze:
            value = value.unsqueeze(0)
        if tuple(value.shape) != want:
            value = value.expand(want)  # broadcasting as tensors allow; raises when impossible
        if self._ram is not None:
            self._ram[start:stop] = value
            return
        value = value.detach().to(device="cpu", dtype=self.dtype).contiguous()
        self._io(start, value, write=True)

    def _io(self, start: int, tensor: Tensor, write: bool) -> None:
        """Read or write contiguous CPU ``tensor`` at row ``start`` of the file."""
        if tensor.numel() == 0:
            return
        view = memoryview(tensor.view(torch.uint8).reshape(-1).numpy())
        offset = start * self._row_bytes
        done = 0
        while done < len(view):
            part = view[done : done + _CHUNK]
            if write:
                n = _pwrite(self._fd, part, offset + done)
            else:
                n = _preadinto(self._fd, part, offset + done)
                if n == 0:
                    raise OSError(f"{self.path} ended early at byte {offset + done}")
            done += n

    def to_tensor(self) -> Tensor:
        """The whole array as one CPU tensor (a copy; as large as the store)."""
        return self[:]

    # ----- lifetime

    def close(self) -> None:
        """Free the RAM or close and delete the spill file; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._ram = None
        if self._fd is not None:
            self._finalizer()  # runs once: closes the file, removes its folder
            self._fd = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


def _preadinto(fd: int, buf: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows: no positional reads; one reader at a time
    data = os.read(fd, len(buf))
    buf[: len(data)] = data
    return len(data)

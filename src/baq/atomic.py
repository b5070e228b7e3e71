"""Every file baq writes: atomically, and only over a regular file of its own or nothing.

A write goes to a temp file beside the target, is fsynced, and is renamed over the target, so a
reader sees the old file or the new one, never half of one. A target that is a symbolic link, a
FIFO, a device, a socket or a folder is refused before anything is written
(:class:`UnsafeOutput`, one line naming the path and the fix): a rename would replace a link
instead of writing where it points, and a device node would become a regular file.

No torch import here: the command line checks its output paths with :func:`check_output_file`
before any model loads.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the process's umask, so files made with mkstemp (mode 0600) get the mode open() would give
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class UnsafeOutput(ValueError):
    """An output path names something baq must not replace; the message is one line."""


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def path_kind(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` is missing or a regular file, else what it is ("a symbolic link",
    "a FIFO (named pipe)", "a device", ...), without following a link or opening anything."""
    try:
        return _kind(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def check_output_file(path: str | os.PathLike, flag: str = "") -> Path:
    """Refuse an output file path that exists and is not a regular file.

    Args:
        path: where a file is about to be written.
        flag: the option that named it (``--report``), to start the message with.
    Returns:
        ``path`` as a :class:`Path`.
    Raises:
        UnsafeOutput: a symbolic link, FIFO, device, socket or folder is there.
    """
    path = Path(path)
    kind = path_kind(path)
    if kind is not None:
        name = f"{flag} {path}" if flag else str(path)
        raise UnsafeOutput(
            f"{name}: is {kind}, and baq writes only new or regular files; "
            "give the path of a regular file"
        )
    return path


def fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk."""
    path = Path(path)
    if path.is_dir():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # platforms that cannot open directories have no directory fsync
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temp file beside it, then a rename.

    Args:
        path: the target; missing, or a regular file (replaced).
        write: fills the temp file whose path it is given (it exists, empty).
    Returns:
        ``path`` as a :class:`Path`.
    Raises:
        UnsafeOutput: ``path`` is a link, FIFO, device, socket or folder (nothing is written).
    """
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        fsync(tmp)
        check_output_file(path)  # again: something may have been put there meanwhile
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        code = os_errno(err)
        if code is not None and not isinstance(err, OSError):
            # safetensors reports a full disk as its own error type: an OSError for the callers
            # (the command line's full-disk hint, ``except OSError``)
            raise OSError(code, os.strerror(code), str(path)) from err
        raise
    fsync(path.parent)
    return path


def os_errno(err: BaseException) -> int | None:
    """The ``errno`` of an OSError, or of a library error that carries one only in its text
    (safetensors' Rust I/O errors end with ``(os error 28)``); None otherwise."""
    if isinstance(err, OSError):
        return err.errno
    match = re.search(r"\(os error (\d+)\)", str(err))
    return int(match.group(1)) if match else None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dump: Any) -> Path:
    """Write JSON atomically, with ``json.dump``'s keyword arguments (default ``indent=2``), and a
    final newline."""
    dump.setdefault("indent", 2)

    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, **dump)
            f.write("\n")

    return write_atomic(path, fill)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically."""
    from safetensors.torch import save_file

    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

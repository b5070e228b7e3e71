"""Writing a saved folder's weight files, whole or in shards (docs/FORMAT.md, section 1).

A weight file (``model.safetensors``, ``quantized.safetensors``) whose tensors take more than the
shard size is split the way transformers splits its checkpoints:
``model-00001-of-00003.safetensors`` and so on, plus ``model.safetensors.index.json`` mapping
every tensor to its shard. A unit (one tensor of the dense file, every tensor of one packed
layer) is never split across shards: a unit larger than the limit gets a shard of its own, as
transformers does with a tensor. A file that fits is written whole, byte for byte as before
shards existed. Reading is in manifest.py
(:func:`~baq.saved.manifest.weight_headers`).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from baq.saved.manifest import index_of, shard_name, write_json

log = logging.getLogger(__name__)

# transformers' name and its 4.x default (5.x saves up to 50GB per file; a hub serves 5GB best)
DEFAULT_MAX_SHARD_SIZE = "5GB"

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?[Bb])?\s*$", re.IGNORECASE)
_POWERS = {"k": 1, "m": 2, "g": 3}


def parse_shard_size(value: int | str) -> int:
    """Parse a shard size as transformers' ``max_shard_size`` means it, into bytes.

    ``"5GB"``, ``"500MB"``, ``"10KB"`` are powers of 1000; ``"5GiB"``, ``"500MiB"``, ``"10KiB"``
    powers of 1024; a lower-case ``b`` after a decimal unit means bits, as in transformers
    (``"8Mb"`` is 1,000,000 bytes); a plain integer (or a string of digits) is bytes.

    Raises:
        ValueError: not a size, or not positive (one line naming the fix).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"max shard size {value!r}: use e.g. 5GB, 500MB, 10KB or a byte count")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(
                f"max shard size {value!r}: use a whole number with an optional unit, e.g. 5GB, "
                "500MB, 10KB, 2GiB or a byte count"
            )
        number, unit = int(match.group(1)), match.group(2) or ""
        if not unit:
            size = number
        elif unit[1:2].lower() == "i":
            size = number * 1024 ** _POWERS[unit[0].lower()]
        else:
            size = number * 1000 ** _POWERS[unit[0].lower()]
            size = size // 8 if unit.endswith("b") else size
    if size < 1:
        raise ValueError(f"max shard size {value!r} is not positive: use e.g. 5GB or 500MB")
    return size


def plan_shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Group consecutive units into shards of at most ``limit`` bytes each.

    A new shard starts when the next unit would push the current one past ``limit``; a unit
    larger than ``limit`` fills a shard alone.

    Args:
        sizes: bytes of each unit, in file order.
        limit: the shard size.
    Returns:
        The unit indices of every shard, in order (one shard when everything fits).
    """
    shards: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if not shards or (used + size > limit and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards or [[]]


def write_weights(
    folder: Path,
    file: str,
    units: list[dict[str, Tensor]] | list[Callable[[], dict[str, Tensor]]],
    limit: int,
    metadata: Callable[[list[int]], dict[str, str]],
    save: Callable[..., None] | None = None,
    sizes: list[int] | None = None,
) -> list[str]:
    """Write ``units`` as ``folder/file``, or as its shards and index when they exceed ``limit``.

    Args:
        folder: the (temporary) save folder.
        file: ``model.safetensors`` or ``quantized.safetensors``.
        units: the tensors, grouped into what must stay in one file, in file order; or
            functions that make them, called when their file is written (then ``sizes``).
        limit: the shard size in bytes.
        metadata: unit indices of one file -> that file's safetensors metadata.
        save: the writer, ``(tensors, filename, metadata=...)`` (None: safetensors' save_file).
        sizes: the bytes of each unit's tensors, required with unit functions (checked when
            made: the shards and the index's ``total_size`` are planned from them).
    Returns:
        The names of the files written (the index last when sharded).
    """
    if save is None:
        from safetensors.torch import save_file as save

    def nbytes(unit: dict[str, Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in unit.values())

    if sizes is None:
        sizes = [nbytes(unit) for unit in units]  # type: ignore[arg-type]
    planned = sizes

    def make(i: int) -> dict[str, Tensor]:
        unit = units[i]
        if not callable(unit):
            return unit
        made = unit()
        if nbytes(made) != planned[i]:  # the index and the shards were planned from the sizes
            raise RuntimeError(f"{file}: unit {i} has {nbytes(made)} bytes, planned {planned[i]}")
        return made

    groups = plan_shards(sizes, limit) if sum(sizes) > limit else [list(range(len(units)))]
    n = len(groups)
    names = [file] if n == 1 else [shard_name(file, i + 1, n) for i in range(n)]
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups):
        tensors = {k: t for i in group for k, t in make(i).items()}
        meta = metadata(group)
        save(tensors, str(folder / name), metadata=meta)
        if len(meta) > 1:  # one key has one order
            sort_metadata(folder / name)
        weight_map |= dict.fromkeys(tensors, name)
    if len(groups) == 1:
        return names
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    write_json(folder / index_of(file), index)
    log.info("%s: %d shards of at most %d bytes", file, len(groups), limit)
    return [*names, index_of(file)]


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors writes the metadata map in hash order, which changes from process to process;
    sorting makes the same save the same bytes. The header keeps its length (the same compact
    JSON, reordered), so the tensor data does not move.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        ordered = {"__metadata__": dict(sorted(meta.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n or raw[len(text) :].strip(b" "):
            log.warning("%s: unexpected safetensors header layout; metadata left unsorted", path)
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))

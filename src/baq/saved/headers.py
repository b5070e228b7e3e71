"""Reading a saved folder's weight files without their data: safetensors headers, the packed
layers' ``layers`` metadata, and the shards of a sharded weight file with their index
(docs/FORMAT.md, sections 1 and 5). The format's names and constants live here too: this is
the lowest module of saved/, and manifest.py (the integrity layer) builds on it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from baq import __version__
from baq.atomic import path_kind
from baq.errors import one_line

FORMAT = "baq"
FORMAT_VERSION = 2  # 2: per-IC grids (a layer's "dim"); version 1 folders are read as per-OC
READ_VERSIONS = (1, 2)
CONFIG_FILE = "config.json"
DENSE_FILE = "model.safetensors"
QUANTIZED_FILE = "quantized.safetensors"
MANIFEST_FILE = "manifest.json"
# each weight file is stored whole or as shards with an index (docs/FORMAT.md, section 1)
WEIGHT_FILES = (DENSE_FILE, QUANTIZED_FILE)


class StorageError(ValueError):
    """A saved model cannot be written or read; the message is one line naming the file."""


# a manifest lists a few dozen files, an index a few thousand tensors; far larger is not ours
MANIFEST_MAX_BYTES = 16 << 20


def index_of(file: str) -> str:
    """The index of a sharded weight file: ``model.safetensors.index.json``."""
    return f"{file}.index.json"


def shard_name(file: str, i: int, n: int) -> str:
    """Shard ``i`` (1-based) of ``n`` of a weight file, named as transformers names them:
    ``model-00001-of-00003.safetensors``."""
    return f"{file.removesuffix('.safetensors')}-{i:05d}-of-{n:05d}.safetensors"


def is_weight_name(name: str) -> bool:
    """A weight file, an index or a shard of either, by its name."""
    stems = "|".join(re.escape(f.removesuffix(".safetensors")) for f in WEIGHT_FILES)
    whole = {*WEIGHT_FILES, *map(index_of, WEIGHT_FILES)}
    shard = re.fullmatch(rf"(?:{stems})-\d{{5}}-of-\d{{5}}\.safetensors", name)
    return name in whole or shard is not None


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StorageError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StorageError(f"{path}: not readable JSON ({one_line(err)})") from err
    if not isinstance(data, dict):
        raise StorageError(f"{path}: expected a JSON object")
    return data


def check_version(path: Path, fmt: Any, version: Any, fmt_key: str) -> None:
    if fmt != FORMAT:
        raise StorageError(f"{path}: {fmt_key} is {fmt!r}, not {FORMAT!r}: not a baq model folder")
    if version not in READ_VERSIONS:
        raise StorageError(
            f"{path}: format version {version!r} is not supported: baq {__version__} reads "
            f"versions {', '.join(map(str, READ_VERSIONS))}"
        )


def check_regular(root: Path, rel: str) -> None:
    """A file of a saved folder is a regular file (or missing) reached through real folders:
    a symbolic link, even one pointing inside the folder, is refused before it is opened."""
    parts = Path(rel).parts
    path = root
    for i, part in enumerate(parts):
        path = path / part
        kind = path_kind(path)
        if kind == "a symbolic link" or (kind is not None and i == len(parts) - 1):
            raise StorageError(
                f"{path}: is {kind}; a saved folder holds regular files only: copy the folder "
                "without links (cp -rL) or save it again"
            )


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[int], int]]]:
    """A safetensors header: ``(metadata, name -> (dtype, shape, nbytes))``, without the data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
            if n < 2 or n > path.stat().st_size - 8:
                raise StorageError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StorageError(f"{path}: not a safetensors file ({one_line(err)})") from err
    meta = header.pop("__metadata__", None) or {}
    try:
        info = {
            k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items()
        }
    except (KeyError, TypeError, IndexError) as err:
        raise StorageError(f"{path}: malformed safetensors header ({one_line(err)})") from err
    return meta, info


def listed_files(root: Path) -> dict:
    """The ``files`` of a folder's manifest, read without checking the files (``verify=False``)."""
    check_regular(root, MANIFEST_FILE)
    files = read_json(root / MANIFEST_FILE, "not a baq model folder").get("files")
    if not isinstance(files, dict):
        raise StorageError(f"{root / MANIFEST_FILE}: 'files' must be a JSON object")
    return files


def weight_files(root: Path, file: str, listed: Any) -> list[str]:
    """The files that hold ``file``'s tensors: ``[file]``, or the shards its index names.

    Shard names come from an untrusted index: each must be a plain file name, listed in the
    manifest (so checked for links, size and SHA-256 there) and named ``shard_name(file, i, n)``
    for exactly ``i = 1..n``; a listed shard the index does not name is refused too.

    Args:
        root: the saved folder.
        file: ``model.safetensors`` or ``quantized.safetensors``.
        listed: the manifest's ``files``.
    Raises:
        StorageError: one line naming the index or the file.
    """
    index = index_of(file)
    if file in listed and index in listed:
        raise StorageError(f"{root / MANIFEST_FILE}: lists both {file} and {index}: one is stray")
    if file in listed:
        return [file]
    if index not in listed:
        raise StorageError(f"{root / MANIFEST_FILE}: does not list {file} or its shards' {index}")
    weight_map = _read_index(root, index)[0]
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise StorageError(f"{root / index}: shard {name!r} is not a plain file name")
        if name not in listed:
            raise StorageError(
                f"{root / index}: names {name!r}, a file {MANIFEST_FILE} does not list"
            )
    expected = [shard_name(file, i + 1, len(shards)) for i in range(len(shards))]
    if shards != expected:
        wrong = sorted(set(shards) - set(expected)) or sorted(set(expected) - set(shards))
        raise StorageError(
            f"{root / index}: shard {wrong[0]!r} does not fit the names "
            f"{expected[0]} .. {expected[-1]} of {len(expected)} shards"
        )
    stem = file.removesuffix(".safetensors")
    for rel in sorted(listed):
        if rel.startswith(f"{stem}-") and rel.endswith(".safetensors") and rel not in shards:
            raise StorageError(f"{root / rel}: a shard {index} does not name: not part of {file}")
    return shards


def _read_index(root: Path, index: str) -> tuple[dict[str, str], int]:
    """``(weight_map, total_size)`` of an index, its types checked."""
    path = root / index
    check_regular(root, index)
    if path.is_file() and path.stat().st_size > MANIFEST_MAX_BYTES:
        raise StorageError(f"{path}: larger than {MANIFEST_MAX_BYTES >> 20} MiB: not an index")
    data = read_json(path, "the index of a sharded weight file")
    weight_map, meta = data.get("weight_map"), data.get("metadata", {})
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
        or not is_int(total)
    ):
        raise StorageError(
            f"{path}: expected {{'metadata': {{'total_size': int}}, 'weight_map': "
            "{tensor: file}} with at least one tensor"
        )
    return weight_map, total


HeaderInfo = dict[str, tuple[str, list[int], int]]


def weight_headers(
    root: Path, file: str, listed: Any
) -> dict[str, tuple[dict[str, str], HeaderInfo]]:
    """Headers of every file holding ``file``'s tensors (:func:`weight_files`), in shard order.

    With shards the index must agree with the headers: every tensor in exactly one shard, the
    one the index names, and ``total_size`` the bytes of all their data.

    Returns:
        File name -> :func:`read_header` of it.
    Raises:
        StorageError: one line naming the file.
    """
    names = weight_files(root, file, listed)
    headers = {name: read_header(root / name) for name in names}
    if names == [file]:
        return headers
    index = index_of(file)
    weight_map, total = _read_index(root, index)
    found: dict[str, str] = {}
    for name, (_, info) in headers.items():
        for key in info:
            if key in found:
                raise StorageError(f"{root / name}: tensor {key} is also in {found[key]}")
            if weight_map.get(key) != name:
                raise StorageError(
                    f"{root / index}: puts tensor {key} in {weight_map.get(key)}, it is in {name}"
                )
            found[key] = name
    missing = sorted(set(weight_map) - set(found))
    if missing:
        raise StorageError(f"{root / weight_map[missing[0]]}: tensor {missing[0]} is missing")
    size = sum(v[2] for _, info in headers.values() for v in info.values())
    if size != total:
        raise StorageError(f"{root / index}: total_size {total}, its shards hold {size} bytes")
    return headers


def merged_info(headers: dict[str, tuple[dict[str, str], HeaderInfo]]) -> HeaderInfo:
    """Tensor name -> (dtype, shape, nbytes) over every file of :func:`weight_headers`."""
    return {k: v for _, info in headers.values() for k, v in info.items()}


def packed_layers(root: Path, headers: dict) -> dict[str, dict]:
    """The checked ``layers`` metadata of the quantized file or shards, in file order.

    Each shard's header holds the ``layers`` of the layers whose tensors it holds; every entry
    gets a ``file`` key (the file it is in). A layer in two files is refused.

    Args:
        root: the saved folder.
        headers: :func:`weight_headers` of ``quantized.safetensors``.
    """
    layers: dict[str, dict] = {}
    for name, (meta, _) in headers.items():
        for layer, m in layers_meta(root / name, meta).items():
            if layer in layers:
                raise StorageError(
                    f"{root / name}: layer {layer} is also in {layers[layer]['file']}"
                )
            layers[layer] = {**m, "file": name}
    return layers


def layers_meta(path: Path, meta: dict[str, str]) -> dict[str, dict]:
    """The ``layers`` metadata of quantized.safetensors, checked: name -> shape, group_size, sym,
    dim ("oc" when absent, as in every version 1 file)."""
    version = int_or(meta.get("format_version"))
    check_version(path, meta.get("format"), version, "format")
    try:
        layers = json.loads(meta["layers"])
        for name, m in layers.items():
            rows, cols = m["shape"]
            gs = m["group_size"]
            if not (is_int(rows) and is_int(cols) and rows >= 1 and cols >= 1):
                raise ValueError(f"layer {name}: shape {m['shape']!r} is not two positive ints")
            if not (gs is None or (is_int(gs) and gs >= 1)):
                raise ValueError(f"layer {name}: group_size {gs!r} is not a positive int or null")
            if not isinstance(m["sym"], bool):
                raise ValueError(f"layer {name}: sym {m['sym']!r} is not true or false")
            dim = m.get("dim", "oc")
            if dim not in ("oc", "ic") or (dim == "ic" and version < 2):
                raise ValueError(f"layer {name}: dim {dim!r} (format version {version})")
            m.update(
                shape=(rows, cols),
                group_size=gs,
                sym=m["sym"],
                dim=dim,
            )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StorageError(f"{path}: bad 'layers' metadata ({one_line(err)})") from err
    return layers


def is_int(value: Any) -> bool:
    """A JSON integer (not a bool, not a float or a string of digits)."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_or(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value

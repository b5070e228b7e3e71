"""The integrity layer of a saved folder: its manifest, atomic placement, and header reads.

``manifest.json`` lists every file's byte count and SHA-256 (docs/FORMAT.md); loading checks it
first, so a damaged folder fails with one line naming the file. The readers here look at file
headers and level tables only, never at the packed codes, so ``baq inspect`` is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from baq import __version__, atomic
from baq.atomic import fsync, path_kind
from baq.errors import one_line

log = logging.getLogger(__name__)

FORMAT = "baq"
FORMAT_VERSION = 2  # 2: per-IC grids (a layer's "dim"); version 1 folders are read as per-OC
READ_VERSIONS = (1, 2)
CONFIG_FILE = "config.json"
DENSE_FILE = "model.safetensors"
QUANTIZED_FILE = "quantized.safetensors"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (CONFIG_FILE, DENSE_FILE, QUANTIZED_FILE)
CARD_FILE = "README.md"
# config.json's transformers_weights: not a safetensors name, so transformers without baq stops
# with an error quoting it (storage.mark_config); baq's quantizer removes it before loading
NEEDS_BAQ = "quantized by baq: pip install baq, then import baq before from_pretrained"


class StorageError(ValueError):
    """A saved model cannot be written or read; the message is one line naming the file."""


# a manifest lists a few dozen files; anything far larger is not one of ours
MANIFEST_MAX_BYTES = 16 << 20


def is_baq_save(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a baq save, the only folder baq replaces or deletes.

    A real folder (not a link) whose ``manifest.json`` is a regular file holding a baq manifest
    that parses: ``format`` "baq", a ``format_version`` this baq reads, and a ``files`` object.
    A web app, a model folder or anything else with a ``manifest.json`` of its own is not.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if folder.is_symlink() or not folder.is_dir() or path_kind(manifest) is not None:
        return False
    try:
        if manifest.stat().st_size > MANIFEST_MAX_BYTES:
            return False
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("format") == FORMAT
        and type(data.get("format_version")) is int
        and data["format_version"] in READ_VERSIONS
        and isinstance(data.get("files"), dict)
    )


def replaceable(target: Path) -> str | None:
    """Why ``target`` (which exists) must not be replaced by a save, or None when it may be:
    an empty real folder, or a baq save (:func:`is_baq_save`)."""
    if target.is_symlink() or not target.is_dir():
        return f"{path_kind(target) or 'a file'}, not a folder"
    if is_baq_save(target) or not any(target.iterdir()):
        return None
    if not (target / MANIFEST_FILE).exists():
        return f"not a baq model folder (no {MANIFEST_FILE})"
    return f"not a baq model folder (its {MANIFEST_FILE} is not a baq manifest)"


def check_target(target: Path, force: bool) -> None:
    """Refuse a save onto an existing path, unless ``force`` and it is replaceable (an empty
    folder or a previous baq save): never a folder baq did not write."""
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise StorageError(f"{target} already exists: pass force=True (--force) to replace it")
    why = replaceable(target)
    if why is not None:
        raise StorageError(
            f"{target} is {why}: refusing to replace it; baq replaces only its own saves, "
            "choose another folder"
        )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: dict) -> None:
    """The manifest's and config's JSON: sorted keys, strict (no NaN), written atomically."""
    atomic.write_json(path, data, indent=2, sort_keys=True, allow_nan=False)


def list_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    )


def folder_bytes(root: str | os.PathLike) -> int:
    """Bytes of every file of a saved folder, the manifest included."""
    root = Path(root)
    return sum((root / rel).stat().st_size for rel in [*list_files(root), MANIFEST_FILE])


def swap_in(tmp: Path, target: Path, force: bool) -> None:
    """Rename ``tmp`` to ``target``; with ``force``, move the old folder away first."""
    old = None
    if force and (target.exists() or target.is_symlink()):
        check_target(target, force)  # again, just before: only a baq save is moved away
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:
            os.rename(old, target)  # put the previous save back where it was
        raise
    fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def verify_manifest(path: str | os.PathLike) -> dict:
    """Check every file a saved folder lists: present, same byte count, same SHA-256.

    Args:
        path: the saved folder.
    Returns:
        The manifest (``format``, ``format_version``, ``files``, ``tied``).
    Raises:
        StorageError: one line naming the file and the problem.
    """
    root = Path(path)
    if not root.is_dir():
        raise StorageError(f"{root}: no such folder")
    check_regular(root, MANIFEST_FILE)
    manifest = read_json(root / MANIFEST_FILE, "not a baq model folder, or an interrupted save")
    check_version(
        root / MANIFEST_FILE, manifest.get("format"), manifest.get("format_version"), "format"
    )
    files = manifest.get("files")
    tied = manifest.get("tied", {})
    if not isinstance(files, dict) or not isinstance(tied, dict):
        raise StorageError(f"{root / MANIFEST_FILE}: 'files' and 'tied' must be JSON objects")
    for rel in REQUIRED_FILES:
        if rel not in files:
            raise StorageError(f"{root / MANIFEST_FILE}: does not list {rel}")
    for rel, entry in files.items():
        file = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(entry, dict):
            raise StorageError(f"{root / MANIFEST_FILE}: bad entry for {rel!r}")
        check_regular(root, rel)
        if not file.is_file():
            raise StorageError(f"{file}: missing (listed in {MANIFEST_FILE})")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise StorageError(
                f"{file}: {size} bytes, {MANIFEST_FILE} says {entry.get('bytes')}: "
                "truncated or modified"
            )
        if sha256_of(file) != entry.get("sha256"):
            raise StorageError(
                f"{file}: SHA-256 differs from {MANIFEST_FILE}: corrupted or modified"
            )
    extra = set(list_files(root)) - set(files)
    if extra:
        log.warning(
            "%s: files not in %s ignored: %s", root, MANIFEST_FILE, ", ".join(sorted(extra))
        )
    return manifest


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


def _quantized_header(root: Path, verify: bool) -> tuple[Path, dict, dict]:
    """``(path, tensor info, layers metadata)`` of quantized.safetensors, after the manifest."""
    if verify:
        verify_manifest(root)
    qpath = root / QUANTIZED_FILE
    meta, info = read_header(qpath)
    return qpath, info, layers_meta(qpath, meta)


def inspect_quantized(path: str | os.PathLike, verify: bool = True) -> list[dict]:
    """One row per quantized layer of a saved folder, from the file headers and level tables.

    Args:
        path: folder written by :func:`save_quantized`.
        verify: check the manifest first.
    Returns:
        Rows in file order with ``name``, ``shape`` (rows, cols), ``nominal_bits`` (mean log2 L),
        ``storage_bits`` (the layer's stored bytes * 8 / (rows * cols)), ``bytes``,
        ``group_size``, ``sym``, ``dim`` and ``levels`` ({L: number of columns}).
    """
    from safetensors import safe_open

    qpath, info, layers = _quantized_header(Path(path), verify)
    rows_out = []
    try:
        with safe_open(str(qpath), framework="pt") as f:
            for name, m in layers.items():
                rows, cols = m["shape"]
                classes = f.get_tensor(f"{name}.level_classes").tolist()
                nbytes = sum(
                    v[2]
                    for k, v in info.items()
                    if k.rpartition(".")[0] == name or k.startswith(f"{name}.codes.")
                )
                L = [c[0] for c in classes]
                n = [c[1] for c in classes]
                rows_out.append(
                    {
                        "name": name,
                        "shape": (rows, cols),
                        "nominal_bits": sum(c * math.log2(x) for x, c in zip(L, n)) / cols,
                        "storage_bits": nbytes * 8 / (rows * cols),
                        "bytes": nbytes,
                        "group_size": m["group_size"],
                        "sym": m["sym"],
                        "dim": m["dim"],
                        "levels": dict(zip(L, n)),
                    }
                )
    except (OSError, SafetensorError) as err:
        raise StorageError(f"{qpath}: {one_line(err)}") from err
    return rows_out


def storage_bits(path: str | os.PathLike, verify: bool = True) -> float:
    """Storage rate of a saved folder: bytes of the packed-layer tensors * 8 / quantized weights.

    Args:
        path: folder written by :func:`save_quantized`.
        verify: check the manifest first.
    Returns:
        Bits per quantized weight (codes, ranges, level tables and permutations all counted).
    """
    qpath, info, layers = _quantized_header(Path(path), verify)
    weights = sum(m["shape"][0] * m["shape"][1] for m in layers.values())
    return sum(v[2] for v in info.values()) * 8 / weights if weights else 0.0

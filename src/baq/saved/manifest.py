"""The integrity layer of a saved folder: its manifest, atomic placement, and ``baq inspect``.

``manifest.json`` lists every file's byte count and SHA-256 (docs/FORMAT.md); loading checks it
first, so a damaged folder fails with one line naming the file. The header readers (headers.py,
whose names this module also exports) look at file headers and level tables only, never at the
packed codes, so ``baq inspect`` is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from baq import atomic
from baq.atomic import fsync, path_kind
from baq.errors import one_line

# the names every reader of a saved folder imports from here
from baq.saved.headers import (  # noqa: F401
    CONFIG_FILE,
    DENSE_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFEST_MAX_BYTES,
    QUANTIZED_FILE,
    READ_VERSIONS,
    WEIGHT_FILES,
    HeaderInfo,
    StorageError,
    check_regular,
    check_version,
    index_of,
    int_or,
    is_int,
    is_weight_name,
    layers_meta,
    listed_files,
    merged_info,
    packed_layers,
    read_header,
    read_json,
    shard_name,
    weight_files,
    weight_headers,
)

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
# config.json's transformers_weights: not a safetensors name, so transformers without baq stops
# with an error quoting it (storage.mark_config); baq's quantizer removes it before loading
NEEDS_BAQ = "quantized by baq: pip install baq, then import baq before from_pretrained"


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
    if CONFIG_FILE not in files:
        raise StorageError(f"{root / MANIFEST_FILE}: does not list {CONFIG_FILE}")
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
    for rel in sorted(extra):
        if is_weight_name(rel):  # transformers would load an unlisted model.safetensors
            raise StorageError(
                f"{root / rel}: a weight file {MANIFEST_FILE} does not list: not part of this "
                "save; remove it, or save the folder again"
            )
    for file in WEIGHT_FILES:
        weight_files(root, file, files)
    if extra:
        log.warning(
            "%s: files not in %s ignored: %s", root, MANIFEST_FILE, ", ".join(sorted(extra))
        )
    return manifest


def _quantized_headers(root: Path, verify: bool) -> tuple[dict, dict[str, dict]]:
    """``(file -> (metadata, tensor info), layers metadata)`` of the quantized file or shards,
    after the manifest."""
    listed = verify_manifest(root)["files"] if verify else listed_files(root)
    headers = weight_headers(root, QUANTIZED_FILE, listed)
    return headers, packed_layers(root, headers)


def inspect_quantized(path: str | os.PathLike, verify: bool = True) -> list[dict]:
    """One row per quantized layer of a saved folder, from the file headers and level tables.

    Args:
        path: folder written by :func:`save_quantized`.
        verify: check the manifest first.
    Returns:
        Rows in file order with ``name``, ``shape`` (rows, cols), ``nominal_bits`` (mean log2 L),
        ``storage_bits`` (the layer's stored bytes * 8 / (rows * cols)), ``bytes``,
        ``group_size``, ``sym``, ``dim``, ``levels`` ({L: number of columns}) and ``rotated``
        (the codes are in the basis of an input-side rotation, ``--rotate``).
    """
    from safetensors import safe_open

    root = Path(path)
    headers, layers = _quantized_headers(root, verify)
    rows_out = []
    for file, (_, info) in headers.items():
        qpath = root / file
        try:
            with safe_open(str(qpath), framework="pt") as f:
                for name, m in layers.items():
                    if m["file"] == file:
                        rows_out.append(_inspect_row(name, m, info, f))
        except (OSError, SafetensorError) as err:
            raise StorageError(f"{qpath}: {one_line(err)}") from err
    return rows_out


def _inspect_row(name: str, m: dict, info: dict, f: Any) -> dict:
    """One row of :func:`inspect_quantized`: the layer's header facts and its level table."""
    rows, cols = m["shape"]
    classes = f.get_tensor(f"{name}.level_classes").tolist()
    nbytes = sum(
        v[2]
        for k, v in info.items()
        if k.rpartition(".")[0] == name or k.startswith(f"{name}.codes.")
    )
    L = [c[0] for c in classes]
    n = [c[1] for c in classes]
    return {
        "name": name,
        "shape": (rows, cols),
        "nominal_bits": sum(c * math.log2(x) for x, c in zip(L, n)) / cols,
        "storage_bits": nbytes * 8 / (rows * cols),
        "bytes": nbytes,
        "group_size": m["group_size"],
        "sym": m["sym"],
        "dim": m["dim"],
        "levels": dict(zip(L, n)),
        "rotated": f"{name}.rotation" in info,
    }


def storage_bits(path: str | os.PathLike, verify: bool = True) -> float:
    """Storage rate of a saved folder: bytes of the packed-layer tensors * 8 / quantized weights.

    Args:
        path: folder written by :func:`save_quantized`.
        verify: check the manifest first.
    Returns:
        Bits per quantized weight (codes, ranges, level tables and permutations all counted).
    """
    headers, layers = _quantized_headers(Path(path), verify)
    weights = sum(m["shape"][0] * m["shape"][1] for m in layers.values())
    stored = sum(v[2] for v in merged_info(headers).values())
    return stored * 8 / weights if weights else 0.0

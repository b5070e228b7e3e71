"""Per-block checkpoints of a quantization run, so an interrupted run resumes where it stopped.

``baq quantize --output DIR`` keeps ``DIR.partial/`` while it works:

    run.json              the fingerprint: settings, calibration and model hashes
    pid                   the process writing it, which holds the folder's ``flock``
    block-00007.safetensors   one per finished block: each layer's codes, levels, ranges, losses
    block-00007.json          that block's layer records (the running report)
    block-00030.*             with ``--include-head``, the output head: the stage after the
                              last block (index = number of blocks), written the same way

Each block file is written to a temporary name and renamed, and its JSON (written the same way)
comes second, so a block counts as done only when both exist. On resume the finished blocks'
weights are rebuilt from their codes, which reproduces the solver's dequantized weights bit for
bit, and the calibration inputs of the next block are recomputed by running the finished blocks
again (one forward each, no Hessians, no solves). The result is byte-identical to an
uninterrupted run.

A lazy run (``--lazy``) also uses the block files as its memory: once a block is written, its
layers' codes are replaced by views of a memory map of the file (:attr:`Checkpoint.map_codes`),
so the results of a model far larger than RAM (a byte per weight: 64 GiB at 70B) are file pages
the kernel reads when the evaluation or the save needs them and drops under pressure.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from baq.atomic import write_text
from baq.config import QuantConfig
from baq.errors import one_line
from baq.quant.gptq import QuantResult
from baq.quant.grid import Grid, dequantize
from baq.quant.layer import LayerRecord
from baq.run.report import write_json, write_safetensors

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PID_FILE = "pid"  # the process writing the folder (the lock is the folder's flock)
CHECKPOINT_VERSION = 1


def partial_dir(output: str | os.PathLike) -> Path:
    """The checkpoint folder of an ``--output`` folder: ``DIR.partial`` beside it."""
    output = Path(output).expanduser().absolute()
    return output.with_name(output.name + ".partial")


def tensor_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of named tensors' names, shapes, dtypes and bytes (meta tensors: no bytes).

    Takes any iterable, so a lazily loaded model can be hashed a block at a time.
    """
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type != "meta":
            # the array's buffer, not a bytes copy: the embeddings may be GBs
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint(
    model: nn.Module,
    calib_ids: Tensor,
    cfg: QuantConfig,
    tensors: Iterable[tuple[str, Tensor]] | None = None,
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: settings, data and weights.

    Args:
        tensors: the model's state as ``(name, tensor)`` pairs, default
            ``model.state_dict().items()``; a lazily loaded model passes
            ``streaming.state_items(model, loader)``, which reads its released blocks, so that
            its digest is the one a full load of the same weights gives.
    """
    return {
        "version": CHECKPOINT_VERSION,
        "config": json.loads(json.dumps(asdict(cfg))),
        "calibration": {
            "shape": list(calib_ids.shape),
            "sha256": tensor_digest([("calib", calib_ids)]),
        },
        "model": {
            "class": type(model).__name__,
            "sha256": tensor_digest(model.state_dict().items() if tensors is None else tensors),
        },
    }


def _differences(old: dict, new: dict, path: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        where = f"{path}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, where + ".")
        elif a != b:
            out.append(f"{where} was {a!r}, now {b!r}" if "sha256" not in key else f"{where}")
    return out


def _read_run(folder: Path) -> dict[str, Any]:
    run_file = folder / RUN_FILE
    try:
        return json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{run_file}: unreadable checkpoint ({err}); delete it") from None


def _refuse_differences(folder: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    diff = _differences(old, new)
    if diff:
        raise ValueError(
            f"--resume: the checkpoint in {folder} is from another run ("
            + "; ".join(diff[:4])
            + ("; ..." if len(diff) > 4 else "")
            + "): rerun with its settings, or delete it"
        )


def check_settings(folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, before any model is loaded.

    Args:
        folder: the checkpoint folder.
        config: ``asdict`` of the new run's :class:`QuantConfig`.
    """
    old = _read_run(Path(folder))
    new = json.loads(json.dumps(config))
    _refuse_differences(Path(folder), {"config": old.get("config")}, {"config": new})


def _another_run(folder: Path) -> ValueError:
    try:
        pid = int((folder / PID_FILE).read_text().strip())
        who = f"another baq run (pid {pid})"
    except (OSError, ValueError):  # not written yet, or by a run of an older baq
        who = "another baq run"
    output = folder.with_name(folder.name.removesuffix(".partial"))
    return ValueError(
        f"{output} is being written by {who}, which holds {folder}: wait for it to finish, or "
        "choose another --output"
    )


def hold(folder: Path) -> int:
    """Take the exclusive lock (``flock``) on a checkpoint folder for this process: a second run
    on the same output is told another run holds it. Released when the process ends.

    Returns:
        The folder's open descriptor (closing it releases the lock).
    Raises:
        ValueError: another process holds the lock.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise _another_run(folder) from None
    return fd


def claim(folder: Path) -> int:
    """:func:`hold` the folder and record this process's id in it (``PID_FILE``), which the
    refusal of a second run names. A run that dies leaves no stale lock (``flock`` locks end
    with their process): the file is read only while its lock is held.

    Returns:
        The folder's open descriptor (closing it releases the lock).
    """
    fd = hold(folder)
    write_text(folder / PID_FILE, f"{os.getpid()}\n")
    return fd


def check_not_held(folder: str | os.PathLike) -> None:
    """Refuse (``ValueError``) when another run holds ``folder``'s lock; nothing is kept."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink():
        os.close(hold(folder))


class Checkpoint:
    """The ``DIR.partial`` folder of one run.

    Args:
        folder: the checkpoint folder.
        fingerprint: from :func:`fingerprint`, for this run.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.created = False  # this run made the folder (open without resume)
        self._lock: int | None = None  # the folder's descriptor, flocked while this run works
        # a lazy run keeps no codes in memory: each finished block's codes are read back from
        # its file through a memory map (file pages the kernel may drop), so the results of a
        # 70B model (a byte per weight) never need 64 GiB of RAM before the save
        self.map_codes = False

    def open(self, resume: bool) -> int:
        """Start a new checkpoint, or (``resume``) check and reuse the existing one.

        Returns:
            The number of finished blocks to restore (0 for a fresh start).
        Raises:
            ValueError: a checkpoint exists but ``resume`` is off; ``resume`` with none; or a
                checkpoint of a different run (the message says what differs).
        """
        run_file = self.folder / RUN_FILE
        if not resume:
            try:
                self.folder.mkdir(parents=True)
            except FileExistsError:
                check_not_held(self.folder)
                raise ValueError(
                    f"{self.folder} holds an interrupted run: add --resume to continue it, "
                    "or delete the folder to start over"
                ) from None
            self.created = True
            self._lock = claim(self.folder)
            write_json(run_file, self.fingerprint)
            return 0
        if not run_file.is_file():
            raise ValueError(f"--resume: no checkpoint at {self.folder}; run without --resume")
        self._lock = claim(self.folder)
        _refuse_differences(self.folder, _read_run(self.folder), self.fingerprint)
        done = 0
        while (self.folder / f"block-{done:05d}.json").is_file():
            done += 1
        return done

    def save_block(
        self, index: int, results: dict[str, QuantResult], records: list
    ) -> dict[str, QuantResult] | None:
        """Write block ``index``: its layers' results (codes, ranges, levels, losses), records.

        Returns:
            With :attr:`map_codes`, the same results with their codes memory-mapped from the
            written file (to replace the caller's copies), else None.
        """
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {}
        for name, res in results.items():
            top = int(res.levels.max())
            codes_dtype = torch.uint8 if top <= 256 else torch.int32
            tensors[f"{name}.codes"] = res.codes.to(codes_dtype).contiguous()
            tensors[f"{name}.levels"] = res.levels.to(torch.int32).contiguous()
            tensors[f"{name}.lo"] = res.grid.lo.float().contiguous()
            tensors[f"{name}.hi"] = res.grid.hi.float().contiguous()
            tensors[f"{name}.losses"] = res.losses.float().contiguous()
            meta[name] = {
                "group_size": res.grid.group_size,
                "sym": res.grid.sym,
                "dim": res.grid.dim,
            }
        stem = self.folder / f"block-{index:05d}"
        write_safetensors(stem.with_suffix(".safetensors"), tensors, {"layers": json.dumps(meta)})
        write_json(
            stem.with_suffix(".json"),
            {"layers": list(results), "records": [asdict(r) for r in records]},
        )
        if not self.map_codes:
            return None
        return _with_mapped_codes(stem.with_suffix(".safetensors"), results)

    def load_block(self, index: int) -> tuple[dict[str, QuantResult], list[LayerRecord]]:
        """Results and records of a finished block, as :meth:`save_block` received them.

        Everything is checked before use (:func:`check_block`): a damaged or hand-edited block
        is a ``ValueError`` naming its file, never a traceback or a resumed run that saves a
        folder baq then refuses.
        """
        from safetensors import safe_open

        stem = self.folder / f"block-{index:05d}"
        path = stem.with_suffix(".safetensors")
        try:
            info = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise BlockError(stem.with_suffix(".json"), one_line(err)) from None
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["layers"])
        except Exception as err:  # safetensors raises its own types on a damaged file
            raise BlockError(path, one_line(err)) from None
        results, records = check_block(stem, info, tensors, meta)
        del tensors
        if self.map_codes:
            results = _with_mapped_codes(path, results)
        return results, records

    def discard_if_new(self) -> None:
        """Delete the folder if this run made it and finished no block yet: a run refused
        before its first block leaves nothing that asks the next one to ``--resume``."""
        if self.created and not any(self.folder.glob("block-*")):
            self.remove()

    def remove(self) -> None:
        """Delete the folder once the final save has landed (and let its lock go)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Let the folder's lock go (also when this object is collected after a failed run)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    __del__ = release


def _with_mapped_codes(path: Path, results: dict[str, QuantResult]) -> dict[str, QuantResult]:
    """``results`` with each layer's codes replaced by a read-only-by-convention view of the
    ``{name}.codes`` tensor of the block file ``path`` (a private memory map: untouched pages
    cost nothing, touched ones are file pages the kernel can drop again; the map outlives the
    file's deletion). Level counts above 256 keep int32 codes, as :func:`streaming.compact`.

    Raises:
        BlockError: the file's codes differ in shape or dtype from the results (not this run's).
    """
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    dtypes = {"U8": torch.uint8, "I32": torch.int32}
    out = {}
    for name, res in results.items():
        info = header.get(f"{name}.codes", {})
        dtype = dtypes.get(info.get("dtype"))
        codes_dtype = torch.uint8 if int(res.levels.max()) <= 256 else torch.int32
        begin, end = (8 + n + k for k in info.get("data_offsets", (0, 0)))
        if dtype != codes_dtype or list(info.get("shape", ())) != list(res.codes.shape):
            raise BlockError(path, f"layer {name}: its codes are not the ones just written")
        raw = data[begin:end]
        if begin % dtype.itemsize:  # safetensors aligns by dtype; a copy if a writer did not
            raw = raw.clone()
        out[name] = replace(res, weight=None, codes=raw.view(dtype).view(res.codes.shape))
    return out


def _tuple_shape(key: str, value: Any) -> Any:
    if key == "shape":
        return tuple(value)
    if key == "level_histogram" and isinstance(value, dict):
        return {int(k): v for k, v in value.items()}
    return value


class BlockError(ValueError):
    """A checkpoint block that cannot be used; one line naming its file and the fix."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"{path}: damaged checkpoint block ({why}); delete {path.parent} and run again "
            "without --resume"
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_block(
    stem: Path, info: Any, tensors: dict[str, Tensor], meta: Any
) -> tuple[dict[str, QuantResult], list[LayerRecord]]:
    """A finished block's results and records, each checked before use.

    Checked: the JSON's ``layers`` and ``records`` (every record field typed as
    :class:`LayerRecord` has it), each layer's metadata (``group_size`` a positive int or null,
    ``sym`` a bool, ``dim`` oc or ic), its tensors (present, integer codes and level counts,
    the shapes the codes give), level counts >= 1, codes in ``[0, L_j - 1]``, finite ranges with
    ``lo <= hi`` and finite losses.

    Raises:
        BlockError: the first problem, naming the block's JSON or safetensors file.
    """
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not isinstance(info, dict) or not isinstance(info.get("layers"), list):
        raise BlockError(js, "no 'layers' list")
    if not isinstance(info.get("records"), list) or not isinstance(meta, dict):
        raise BlockError(js if not isinstance(info.get("records"), list) else st, "bad layout")
    results = {}
    for name in info["layers"]:
        m = meta.get(name) if isinstance(name, str) else None
        if not isinstance(m, dict):
            raise BlockError(st, f"no metadata for layer {name!r}")
        try:
            results[name] = _layer_result(name, m, tensors)
        except ValueError as err:
            raise BlockError(st, f"layer {name}: {err}") from None
    return results, [_record(js, r) for r in info["records"]]


def _layer_result(name: str, m: dict, tensors: dict[str, Tensor]) -> QuantResult:
    gs, sym, dim = m.get("group_size"), m.get("sym"), m.get("dim", "oc")
    if not (gs is None or (_is_int(gs) and gs >= 1)) or not isinstance(sym, bool):
        raise ValueError(f"group_size {gs!r} / sym {sym!r}: a positive int or null / a bool")
    if dim not in ("oc", "ic"):
        raise ValueError(f"dim {dim!r}: oc or ic")
    parts = {}
    for key in ("codes", "levels", "lo", "hi", "losses"):
        if f"{name}.{key}" not in tensors:
            raise ValueError(f"tensor {name}.{key} is missing")
        parts[key] = tensors[f"{name}.{key}"]
    codes, levels = parts["codes"], parts["levels"]
    if codes.dim() != 2 or codes.is_floating_point() or levels.is_floating_point():
        raise ValueError("codes must be a 2-D integer tensor, levels an integer one")
    rows, cols = codes.shape
    along = cols if dim == "oc" else rows
    groups = 1 if gs is None else -(-along // gs)
    grid_shape = (rows, groups) if dim == "oc" else (groups, cols)
    want = {"levels": (cols,), "lo": grid_shape, "hi": grid_shape, "losses": (cols,)}
    for key, shape in want.items():
        if tuple(parts[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(parts[key].shape)}, expected {shape}")
    levels = levels.to(torch.int64)
    codes = codes.to(torch.int64)
    if rows * cols == 0 or int(levels.min()) < 1:
        raise ValueError("empty layer, or a level count below 1")
    if int(codes.min()) < 0 or bool((codes >= levels.unsqueeze(0)).any()):
        raise ValueError("codes outside [0, L - 1]")
    lo, hi, losses = (parts[k].float() for k in ("lo", "hi", "losses"))
    if not all(bool(torch.isfinite(t).all()) for t in (lo, hi, losses)):
        raise ValueError("NaN or infinite ranges or losses")
    if bool((lo > hi).any()):
        raise ValueError("a range with lo > hi")
    grid = Grid(lo, hi, gs, sym, dim)
    weight = dequantize(codes.to(torch.int32), grid, levels)  # bitwise the solver's weight
    return QuantResult(weight, codes.to(torch.int32), grid, levels, losses)


def _record(path: Path, r: Any) -> LayerRecord:
    names = {f.name for f in fields(LayerRecord)}
    try:
        if not isinstance(r, dict):
            raise TypeError("a record is not an object")
        rec = LayerRecord(**{k: _tuple_shape(k, v) for k, v in r.items() if k in names})
        if not isinstance(rec.name, str) or not isinstance(rec.shape, tuple):
            raise TypeError("record name or shape of the wrong type")
    except (TypeError, ValueError, AttributeError) as err:
        raise BlockError(path, f"bad record: {one_line(err)}") from None
    return rec

"""Per-block checkpoints of a quantization run, so an interrupted run resumes where it stopped.

``baq quantize --output DIR`` keeps ``DIR.partial/`` while it works:

    run.json              the fingerprint: settings, calibration and model hashes
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from baq.config import QuantConfig
from baq.quant.gptq import QuantResult
from baq.quant.grid import Grid, dequantize
from baq.quant.layer import LayerRecord
from baq.run.report import write_json, write_safetensors

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
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


class Checkpoint:
    """The ``DIR.partial`` folder of one run.

    Args:
        folder: the checkpoint folder.
        fingerprint: from :func:`fingerprint`, for this run.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

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
            if self.folder.exists():
                raise ValueError(
                    f"{self.folder} holds an interrupted run: add --resume to continue it, "
                    "or delete the folder to start over"
                )
            self.folder.mkdir(parents=True)
            write_json(run_file, self.fingerprint)
            return 0
        if not run_file.is_file():
            raise ValueError(f"--resume: no checkpoint at {self.folder}; run without --resume")
        _refuse_differences(self.folder, _read_run(self.folder), self.fingerprint)
        done = 0
        while (self.folder / f"block-{done:05d}.json").is_file():
            done += 1
        return done

    def save_block(self, index: int, results: dict[str, QuantResult], records: list) -> None:
        """Write block ``index``: its layers' results (codes, ranges, levels, losses), records."""
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

    def load_block(self, index: int) -> tuple[dict[str, QuantResult], list[LayerRecord]]:
        """Results and records of a finished block, as :meth:`save_block` received them."""
        stem = self.folder / f"block-{index:05d}"
        try:
            info = json.loads(stem.with_suffix(".json").read_text())
            path = stem.with_suffix(".safetensors")
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["layers"])
        except Exception as err:  # any damage means this block must be redone by hand
            raise ValueError(
                f"{stem}: damaged checkpoint block ({err}); delete the folder"
            ) from err
        results = {}
        for name in info["layers"]:
            grid = Grid(
                tensors[f"{name}.lo"],
                tensors[f"{name}.hi"],
                meta[name]["group_size"],
                meta[name]["sym"],
                meta[name].get("dim", "oc"),  # checkpoints from before per-IC grids
            )
            levels = tensors[f"{name}.levels"].to(torch.int64)
            codes = tensors[f"{name}.codes"].to(torch.int32)
            weight = dequantize(codes, grid, levels)  # bitwise the solver's dequantized weight
            results[name] = QuantResult(weight, codes, grid, levels, tensors[f"{name}.losses"])
        names = {f.name for f in fields(LayerRecord)}
        records = [
            LayerRecord(**{k: _tuple_shape(k, v) for k, v in r.items() if k in names})
            for r in info["records"]
        ]
        return results, records

    def remove(self) -> None:
        """Delete the folder once the final save has landed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _tuple_shape(key: str, value: Any) -> Any:
    if key == "shape":
        return tuple(value)
    if key == "level_histogram" and isinstance(value, dict):
        return {int(k): v for k, v in value.items()}
    return value

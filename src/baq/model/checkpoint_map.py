"""Which checkpoint tensor fills which model tensor, for loading a model block by block.

``map_checkpoint`` matches every parameter and persistent buffer of a model skeleton (built on
meta) to a tensor of a local safetensors checkpoint, from the headers only: the name (with or
without the model's ``base_model_prefix``), the shape, the dtype it takes in the model (as
``from_pretrained`` casts it, float32 modules kept), and the names it shares through tied
weights. It then splits them into the tensors outside the decoder blocks (always resident) and
those of each block,
which ``baq.model.lazy.LazyLoader`` reads and drops one block at a time.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from baq.saved.manifest import StorageError, read_header

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# checkpoint tensor name -> (file, safetensors dtype name, shape)
Checkpoint = dict[str, tuple[Path, str, tuple[int, ...]]]

# safetensors header dtype names -> torch dtypes (those torch has)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)


class LazyLoadUnsupported(ValueError):
    """The checkpoint cannot be loaded lazily; load it in full with
    ``baq.model.loader.load_model``."""


@dataclass
class Slot:
    """One checkpoint tensor and every name it has in the model (several when weights are tied)."""

    names: list[str]  # model names (parameters or buffers), first is the canonical one
    key: str  # name in the checkpoint
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype in the model (after the cast)
    is_param: bool
    requires_grad: bool
    nbytes: int  # size in the model's dtype


def checkpoint_tensors(folder: Path) -> Checkpoint:
    """Checkpoint tensor name -> (file, safetensors dtype name, shape), over all shards.

    Reads only the headers (``baq.saved.manifest.read_header``).
    """
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise LazyLoadUnsupported(f"{index} is not a safetensors index: {err}") from err
        files = sorted(set(weight_map.values()))
    else:
        files = [SINGLE_FILE]
    found: Checkpoint = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise LazyLoadUnsupported(f"{path} is listed in {INDEX_FILE} but missing")
        try:
            _, header = read_header(path)
        except StorageError as err:
            raise LazyLoadUnsupported(str(err)) from err
        for key, (dtype, shape, _) in header.items():
            found[key] = (path, dtype, tuple(shape))
    return found


def config_dtype(config: Any) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def main_dtype(requested: torch.dtype | str, config: Any, ckpt: Checkpoint) -> torch.dtype:
    """The model dtype: as requested, or for ``auto`` as ``from_pretrained`` picks it.

    ``auto`` is the config's dtype, else the dtype of the first floating tensor of the first
    checkpoint file.
    """
    if isinstance(requested, torch.dtype):
        return requested
    found = config_dtype(config)
    if found is not None:
        return found
    for key in sorted(ckpt, key=lambda k: (str(ckpt[k][0]), k)):
        dtype = ST_DTYPES.get(ckpt[key][1])
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return torch.get_default_dtype()


def fp32_patterns(model: PreTrainedModel, dtype: torch.dtype) -> list[str]:
    """Module names that ``from_pretrained`` keeps in float32 at this dtype."""
    keep: list[str] = []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return keep


def tie_groups(model: PreTrainedModel, names: list[str]) -> list[list[str]]:
    """Group model tensor names that must share one tensor (tied weights), canonical first.

    Ties come from tensors that are already the same object in the skeleton (transformers 4
    ties in ``post_init``) and from ``all_tied_weights_keys`` (transformers 5 ties after
    loading: alias -> source).
    """
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def union(source: str, alias: str) -> None:
        a, b = root(source), root(alias)
        if a != b:
            parent[b] = a

    by_id: dict[int, str] = {}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name in names:
        first = by_id.setdefault(id(tensors[name]), name)
        union(first, name)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for alias, source in tied.items():
        if alias in parent and source in parent:
            union(source, alias)
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[root(name)].append(name)
    return [sorted(group, key=lambda n: n != r) for r, group in groups.items()]


def split_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def block_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def map_checkpoint(
    model: PreTrainedModel,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    prefix: str,
    num_blocks: int,
) -> tuple[list[Slot], list[list[Slot]]]:
    """Match every model tensor to a checkpoint tensor; split them into resident and per block."""
    params = dict(model.named_parameters(remove_duplicate=False))
    persistent = {}
    for name, buf in model.named_buffers(remove_duplicate=False):
        module, attr = split_name(model, name)
        if attr not in module._non_persistent_buffers_set:
            persistent[name] = buf
    base = getattr(model, "base_model_prefix", "") or ""
    keep_fp32 = fp32_patterns(model, dtype)
    resident: list[Slot] = []
    per_block: list[list[Slot]] = [[] for _ in range(num_blocks)]
    missing: list[str] = []
    for group in tie_groups(model, [*params, *persistent]):
        key = None
        for name in group:
            candidates = [name]
            if base and name.startswith(base + "."):
                candidates.append(name[len(base) + 1 :])
            key = next((c for c in candidates if c in ckpt), None)
            if key is not None:
                break
        is_param = group[0] in params
        placeholder = params[group[0]] if is_param else persistent[group[0]]
        if key is None:
            if is_param:
                missing.append(group[0])
            else:
                log.debug("buffer %s is not in the checkpoint: keeping its built value", group[0])
            continue
        file, st_name, shape = ckpt[key]
        if shape != tuple(placeholder.shape):
            raise LazyLoadUnsupported(
                f"{key} has shape {shape} in the checkpoint but {tuple(placeholder.shape)} in "
                "the model"
            )
        st_dtype = ST_DTYPES.get(st_name)
        if st_dtype is None:
            raise LazyLoadUnsupported(f"{key} has dtype {st_name}, which torch lacks")
        target = st_dtype
        if st_dtype.is_floating_point:
            fp32 = any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", group[0]) for p in keep_fp32)
            target = torch.float32 if fp32 else dtype
        numel = 1
        for size in shape:
            numel *= size
        slot = Slot(
            names=group,
            key=key,
            file=file,
            shape=shape,
            dtype=target,
            is_param=is_param,
            requires_grad=bool(getattr(placeholder, "requires_grad", False)),
            nbytes=numel * torch.empty((), dtype=target).element_size(),
        )
        owners = {block_index(name, prefix) for name in group}
        if len(owners) == 1 and None not in owners:
            per_block[owners.pop()].append(slot)
        else:
            resident.append(slot)
    if missing:
        raise LazyLoadUnsupported(
            f"{len(missing)} model parameters are not in the checkpoint under their names "
            f"(e.g. {', '.join(missing[:3])}): the checkpoint needs transformers' key conversions"
        )
    return resident, per_block

"""Dequantized export: a saved baq folder as a plain Hugging Face folder any tool loads.

Each packed linear becomes the model's own linear module again (``nn.Linear``, GPT-2's
``Conv1D``) holding the dequantized weight of docs/FORMAT.md section 8, computed in float32 and
then cast to the export dtype; every other tensor is cast to the same dtype. The folder has no
``quantization_config``, manifest or packed file: llama.cpp's converter, vLLM or any harness reads
it as an ordinary model, with baq's quantization error and none of its memory savings.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from baq.errors import one_line
from baq.saved.manifest import StorageError, fsync, list_files, swap_in
from baq.saved.packed_linear import PackedLinear
from baq.saved.shards import DEFAULT_MAX_SHARD_SIZE, parse_shard_size

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`PackedLinear` of ``model`` by the model's own dense linear, in place.

    The module type comes from a skeleton of the model built on the meta device, so a GPT-2
    ``Conv1D`` comes back as a ``Conv1D`` (with its weight stored transposed). A tensor tied to a
    packed layer on load (``PackedLinear.aliases``: the input embedding of a packed head) becomes
    the new linear's very weight again.

    Args:
        model: a transformers model with packed linears.
        dtype: dtype of the dense weights (None: float32, the dequantization's own dtype).
    Returns:
        ``model``.
    """
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not packed:
        return model
    with init_empty_weights():
        skeleton = type(model)(model.config)
    for name, layer in packed.items():
        dense = skeleton.get_submodule(name)
        device = layer.level_classes.device
        W = layer.dequantize().to(device=device, dtype=dtype or torch.float32)
        dense.weight = nn.Parameter(W.t().contiguous() if isinstance(dense, Conv1D) else W)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.to(W.dtype))
        elif getattr(dense, "bias", None) is not None:
            dense.bias = None
        model.set_submodule(name, dense)
        for alias in layer.aliases:  # a tied input embedding: one parameter again, as before
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, dense.weight)
    return model


def export_dequantized(
    saved: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``saved`` (a baq folder) to ``out_dir`` as a plain folder of dequantized weights.

    Atomic like every save: written to a temp folder beside ``out_dir``, fsynced, renamed.

    Args:
        saved: a folder written by :func:`baq.saved.storage.save_quantized` (checked as by
            :func:`baq.load`).
        out_dir: the new folder; must not exist (or be empty).
        dtype: dtype of every floating tensor of the export.
        max_shard_size: weights larger than this are written as transformers' shards and index
            (shards.parse_shard_size), by transformers' own ``save_pretrained``.
    Returns:
        The absolute path of the export.
    Raises:
        StorageError: a damaged ``saved`` folder, an existing ``out_dir``, a write error.
    """
    from baq.saved.storage import load_quantized

    target = Path(out_dir).expanduser().absolute()
    limit = parse_shard_size(max_shard_size)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise StorageError(f"{target} already exists: choose a new --output folder")
    model, tokenizer = load_quantized(saved, cache="none")
    dequantize_model(model, dtype)
    model.to(dtype)
    model.config.use_cache = True
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=limit)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for rel in list_files(tmp):
            fsync(tmp / rel)
        fsync(tmp)
        if target.exists():
            target.rmdir()  # the empty folder checked above
        swap_in(tmp, target, force=False)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"cannot export to {target}: {one_line(err)}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (%s)", saved, target, str(dtype).removeprefix("torch."))
    return target

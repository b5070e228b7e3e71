"""The packed on-disk format: saving, and the package's storage API (loading is loading.py,
integrity manifest.py, the module packed_linear.py).

A saved model is a Hugging Face folder (``config.json`` with a ``quantization_config`` block,
tokenizer files, safetensors weights) plus ``quantized.safetensors`` with the packed layers and a
``manifest.json`` of SHA-256 digests; a weight file larger than the shard size is split into
shards with an index, as transformers does (shards.py); docs/FORMAT.md specifies every byte.
Saves are atomic (a temp folder beside the target, fsynced, renamed at the end); loads verify the
manifest first, so a damaged folder fails with one line naming the file, never with silently
wrong weights.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from baq import __version__
from baq.config import QuantConfig
from baq.errors import one_line
from baq.model import blocks
from baq.quant.gptq import QuantResult
from baq.saved.loading import load_quantized
from baq.saved.manifest import (
    CARD_FILE,
    CONFIG_FILE,
    DENSE_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    NEEDS_BAQ,
    QUANTIZED_FILE,
    StorageError,
    check_target,
    fsync,
    inspect_quantized,
    list_files,
    read_json,
    sha256_of,
    storage_bits,
    swap_in,
    verify_manifest,
    write_json,
)
from baq.saved.packed_linear import PackedLinear
from baq.saved.result_sizes import layer_meta, nominal_bits_of, result_nbytes, storage_bits_of
from baq.saved.shards import DEFAULT_MAX_SHARD_SIZE, parse_shard_size, write_weights

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "PackedLinear",
    "StorageError",
    "inspect_quantized",
    "load_quantized",
    "save_quantized",
    "storage_bits",
    "storage_bits_of",
    "verify_manifest",
]


# ----------------------------------------------------------------------------- save


def _json_safe(value: Any) -> Any:
    """Summary values as strict JSON: tuples to lists, tensors to numbers, NaN/Inf to null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return _json_safe(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _dense_state(
    model: nn.Module, quantized: set[str], loader: Any = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of the state dict except the quantized weights, with aliases stored once.

    With the ``LazyLoader`` of a lazily loaded model, released blocks' tensors are read from
    its checkpoint (``streaming.dense_state``) instead of refused as meta tensors.

    Returns:
        ``(tensors, tied)``: contiguous CPU tensors by name, and alias name -> stored name for
        tensors that are the very same view of one storage (tied embeddings). An alias of a
        quantized weight ``N.weight`` (the input embedding of a model whose tied head is packed)
        is not stored: it is the dequantized weight of the packed layer ``N``.
    """
    skip = {f"{name}.weight" for name in quantized}
    modules = dict(model.named_modules())
    tied: dict[str, str] = {}
    for name in quantized:
        if isinstance(modules.get(name), PackedLinear):  # a packed model: its buffers are the codes
            skip |= {f"{name}.{b}" for b, _ in modules[name].named_buffers() if b != "bias"}
            tied |= {alias: f"{name}.weight" for alias in modules[name].aliases}
    if loader is None:
        state = model.state_dict()
    else:
        from baq.run.streaming import dense_state

        state = dense_state(model, skip, loader)

    def view_of(key: str, t: Tensor) -> tuple:
        if t.device.type == "meta":
            raise StorageError(f"{key} is on the meta device: load the model's weights first")
        return (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)

    first: dict[tuple, str] = {}  # the quantized weights' views first: aliases may come before
    for key in sorted(skip & set(state)):
        view = view_of(key, state[key])
        if view in first:
            raise StorageError(f"{key} is tied to {first[view]}: a tied weight is packed once")
        first[view] = key
    storages: set[tuple] = set()
    tensors: dict[str, Tensor] = {}
    for key, t in state.items():
        if key in skip:
            continue
        if key in tied:
            _check_alias(key, t, modules[tied[key].removesuffix(".weight")])
            continue
        view = view_of(key, t)
        if view in first:
            tied[key] = first[view]
            continue
        first[view] = key
        storage = (t.device, t.untyped_storage().data_ptr())
        # another view of a storage already stored: safetensors refuses shared memory, copy it
        t = t.detach().cpu().contiguous() if storage not in storages else t.detach().cpu().clone()
        storages.add(storage)
        tensors[key] = t
    return tensors, tied


def _check_alias(key: str, t: Tensor, layer: PackedLinear) -> None:
    """A tensor tied to a packed layer on load must still hold its dequantized weight."""
    W = layer.dequantize().to(device=t.device, dtype=t.dtype)
    if not torch.equal(t.detach(), W):
        raise StorageError(
            f"{key} no longer equals the dequantized weight it is tied to: a saved folder "
            "stores it once, packed; load the folder again instead of editing the tensor"
        )


def save_quantized(
    out_dir: str | os.PathLike,
    model: nn.Module,
    tokenizer: Any,
    results: dict[str, QuantResult],
    cfg: QuantConfig,
    summary: dict | None = None,
    force: bool = False,
    loader: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save a quantized model as a packed Hugging Face folder, atomically.

    Everything is written into a temp folder beside ``out_dir``, fsynced, with ``manifest.json``
    last, then renamed to ``out_dir``: an interrupted save leaves no folder at ``out_dir``.

    Args:
        out_dir: target folder; must not exist unless ``force`` (then a previous baq save or an
            empty folder there is replaced atomically).
        model: the causal LM whose quantized linears are named in ``results``.
        tokenizer: saved with ``save_pretrained`` (None: no tokenizer files).
        results: full module name (as in ``model.named_modules()``) -> solver result.
        cfg: the settings, recorded in ``quantization_config``.
        summary: report numbers for ``quantization_config["summary"]`` (perplexities, ...).
        force: replace an existing save.
        loader: the ``baq.model.lazy.LazyLoader`` of a model opened with ``open_lazy``, whose blocks
            are on meta: their unquantized tensors are read from its checkpoint. Results may be
            compact (``weight`` None): only codes, grid and levels are saved.
        max_shard_size: ``model.safetensors`` and ``quantized.safetensors`` larger than this are
            split into shards with an index (transformers' ``max_shard_size``: ``"5GB"``,
            ``"500MB"``, bytes; shards.parse_shard_size); smaller ones stay one file.
    Returns:
        The absolute path of the saved folder.
    Raises:
        StorageError: existing target, a results name the model lacks, a write error (the temp
            folder is removed).
        ValueError: a ``max_shard_size`` that is not a size.
    """
    from baq.saved.model_card import base_model_id

    target = Path(out_dir).expanduser().absolute()
    parse_shard_size(max_shard_size)  # before any work
    check_target(target, force)
    modules = dict(model.named_modules())
    for name, res in results.items():
        module = modules.get(name)
        if module is None:
            raise StorageError(f"results name {name!r} is not a module of {type(model).__name__}")
        shape = tuple(blocks.get_weight(module).shape)
        if shape != tuple(res.codes.shape):
            raise StorageError(f"{name}: result shape {tuple(res.codes.shape)}, module {shape}")
    packed = PackOnDemand(results)
    qconfig = {
        "quant_method": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "bits": cfg.bits,
        "nominal_bits": nominal_bits_of(results),
        "storage_bits": storage_bits_of(results),
        "group_size": cfg.group_size,
        "sym": cfg.sym,
        "act_order": cfg.act_order,
        "quantized_modules": len(results),
        "config": _json_safe(asdict(cfg)),
        "summary": _json_safe(summary or {}),
        "baq_version": __version__,
        "base_model": base_model_id(model),
    }
    return save_packed(target, model, tokenizer, packed, qconfig, force, loader, max_shard_size)


def save_packed(
    out_dir: str | os.PathLike,
    model: nn.Module,
    tokenizer: Any,
    packed: Mapping[str, PackedLinear],
    qconfig: dict,
    force: bool = False,
    loader: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a saved folder from packed layers: the second half of :func:`save_quantized`.

    Also what ``save_pretrained`` of a model loaded through transformers calls
    (:mod:`baq.integrations.transformers_quantizer`), whose quantized linears are already
    :class:`PackedLinear`.

    Args:
        out_dir, model, tokenizer, force, loader, max_shard_size: as in :func:`save_quantized`.
        packed: full module name -> the layer's :class:`PackedLinear` (the module in ``model``
            itself, or one built from a solver result for a module that still holds the weight).
        qconfig: the ``quantization_config`` block (docs/FORMAT.md, section 3).
    Returns:
        The absolute path of the saved folder.
    """
    from baq.saved.model_card import model_card

    target = Path(out_dir).expanduser().absolute()
    limit = parse_shard_size(max_shard_size)
    check_target(target, force)
    names = list(packed)
    sizes = None
    if isinstance(packed, PackOnDemand):  # packed a shard at a time, as the writer reaches it
        units: list = [lambda name=name: packed[name].file_tensors(name) for name in names]
        sizes = [packed.nbytes(name) for name in names]
        layers = {name: packed.file_meta(name) for name in names}
    else:
        units = [packed[name].file_tensors(name) for name in names]  # a layer stays in one file
        layers = {name: packed[name].file_meta() for name in names}
    dense, tied = _dense_state(model, set(packed), loader)
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig
    config.architectures = [type(model).__name__]
    config.use_cache = True  # calibration turns the KV cache off; generation wants it back

    def packed_meta(group: list[int]) -> dict[str, str]:
        """Each quantized file's header describes the layers it holds (docs/FORMAT.md, 5)."""
        held = {names[i]: layers[names[i]] for i in group}
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layers": json.dumps(held)}

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_weights(tmp, QUANTIZED_FILE, units, limit, packed_meta, save_file, sizes)
        dense_units = [{key: t} for key, t in dense.items()]
        write_weights(tmp, DENSE_FILE, dense_units, limit, lambda _: {"format": "pt"}, save_file)
        config.save_pretrained(tmp)
        mark_config(tmp / CONFIG_FILE)
        _save_generation_config(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CARD_FILE).write_text(model_card(qconfig), encoding="utf-8")
        files = {}
        for rel in list_files(tmp):
            fsync(tmp / rel)
            files[rel] = {"bytes": (tmp / rel).stat().st_size, "sha256": sha256_of(tmp / rel)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
        manifest["tied"] = tied
        write_json(tmp / MANIFEST_FILE, manifest)
        fsync(tmp / MANIFEST_FILE)
        fsync(tmp)
        swap_in(tmp, target, force)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"cannot save {target}: {one_line(err)}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "saved %d packed layers to %s (%.3f storage bits)",
        len(packed),
        target,
        qconfig["storage_bits"],
    )
    return target


class PackOnDemand(Mapping[str, PackedLinear]):
    """Solver results seen as packed layers, each packed when asked and not kept.

    A save of these holds the packed layers of one shard at a time instead of the whole model's
    (0.4 bytes a weight at 3 bits: 26 GiB for a 70B), and the results may hold their codes in
    memory-mapped checkpoint files (``Checkpoint.map_codes``), so a lazy run's save needs about
    one shard of memory. Sizes and metadata come from the level counts, without packing.
    """

    def __init__(self, results: dict[str, QuantResult]) -> None:
        self.results = results

    def __getitem__(self, name: str) -> PackedLinear:
        return PackedLinear.from_quantized(self.results[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def nbytes(self, name: str) -> int:
        return result_nbytes(self.results[name])

    def file_meta(self, name: str) -> dict[str, Any]:
        res = self.results[name]
        return layer_meta(tuple(res.codes.shape), res.grid.group_size, res.grid.sym, res.grid.dim)


def mark_config(path: Path) -> None:
    """Add :data:`NEEDS_BAQ` as ``transformers_weights`` to a written config.json.

    transformers loads the file a config names there, and stops with an error quoting the name
    when it is not a safetensors file; without baq imported, ``from_pretrained`` would otherwise
    warn about the unknown ``quant_method`` and return random weights for every packed linear.
    ``import baq`` registers a quantizer that drops the key before the files are resolved.
    ``config.save_pretrained`` deletes this key, so it is added to the file afterwards.
    """
    data = read_json(path, "the model config")
    data["transformers_weights"] = NEEDS_BAQ
    write_json(path, data)


def _save_generation_config(model: nn.Module, folder: Path) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    try:
        gen.save_pretrained(folder)
    except ValueError as err:  # an invalid generation config must not lose the whole save
        log.warning("generation_config.json not saved: %s", one_line(err))

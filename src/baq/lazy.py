"""Lazy loading: keep only one decoder block of a local safetensors checkpoint in memory.

``open_lazy`` builds the model's skeleton on the meta device (``accelerate.init_empty_weights``
plus ``AutoModelForCausalLM.from_config``), then reads from disk every tensor outside the decoder
blocks: embeddings, final norm, LM head. Buffers are built for real by the constructor (they
are not put on meta), so non-persistent ones that no checkpoint holds, such as the rotary
``inv_freq``, have exactly the values a normal load gives. Decoder blocks stay on meta until
``LazyLoader.load_block`` reads their tensors (and nothing else) with ``safetensors.safe_open``;
``LazyLoader.release_block`` puts them back on meta. Peak memory is then the resident part plus
one block, whatever the depth of the model.

On the CPU, with no dtype cast, safetensors hands out tensors that view a private (copy on
write) mapping of the file: pages count as resident only once touched, writes never reach the
file, and the mapping goes away with the last tensor read in the same ``load_block`` call.

Only local folders written by ``save_pretrained`` with safetensors weights (``model.safetensors``
or shards listed in ``model.safetensors.index.json``) qualify; ``can_load_lazily`` says whether
a model argument does, and ``open_lazy`` raises :class:`LazyLoadUnsupported` (before reading any
weight) when the checkpoint's names or shapes do not match the model, so that callers can fall
back to ``baq.models.load_model``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import blocks, models

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype names -> torch dtypes (those torch has)
_ST_DTYPES: dict[str, torch.dtype] = {
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
        _ST_DTYPES[_name] = getattr(torch, _attr)


_LIBC: Any = None


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Walking blocks frees and reallocates tens of MiB per block; glibc's adaptive mmap
    threshold then serves these from the heap, whose fragments are not returned, so the
    resident set creeps up by about a block's temporaries per block (+260 MiB over 16 blocks
    of a 1024-wide Llama) unless trimmed. ``release_block`` calls this.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6")
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
            except OSError:
                pass
    if _LIBC:
        _LIBC.malloc_trim(0)


class LazyLoadUnsupported(ValueError):
    """The checkpoint cannot be loaded lazily; load it in full with ``baq.models.load_model``."""


def can_load_lazily(name_or_path: str | os.PathLike | None, gguf_file: str | None = None) -> bool:
    """Whether a model argument names a local folder that ``open_lazy`` can read.

    True for a folder with ``config.json`` and ``model.safetensors`` or
    ``model.safetensors.index.json``. False for None (the GGUF reference model), GGUF files,
    hub ids, and folders with ``.bin`` weights only. Cheap: it only looks at file names.
    ``open_lazy`` may still raise :class:`LazyLoadUnsupported` (checkpoint names that need
    transformers' key conversions, remote code): fall back to the full load then.
    """
    if name_or_path is None or gguf_file is not None or str(name_or_path).endswith(".gguf"):
        return False
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


@dataclass
class _Slot:
    """One checkpoint tensor and every name it has in the model (several when weights are tied)."""

    names: list[str]  # model names (parameters or buffers), first is the canonical one
    key: str  # name in the checkpoint
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype in the model (after the cast)
    is_param: bool
    requires_grad: bool
    nbytes: int  # size in the model's dtype


def _read_header(file: Path) -> dict[str, dict[str, Any]]:
    """The safetensors header of ``file``: tensor name -> {dtype, shape, data_offsets}."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise LazyLoadUnsupported(f"{file} is not a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise LazyLoadUnsupported(f"{file} is not a safetensors file (header of {size} bytes)")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _checkpoint(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Checkpoint tensor name -> (file, header entry), over all shards."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise LazyLoadUnsupported(f"{index} is not a safetensors index: {err}") from err
        files = sorted(set(weight_map.values()))
    else:
        files = [SINGLE_FILE]
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise LazyLoadUnsupported(f"{path} is listed in {INDEX_FILE} but missing")
        for key, entry in _read_header(path).items():
            found[key] = (path, entry)
    return found


def _config_dtype(config: Any) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _main_dtype(
    requested: torch.dtype | str, config: Any, ckpt: dict[str, tuple[Path, dict[str, Any]]]
) -> torch.dtype:
    """The model dtype: as requested, or for ``auto`` as ``from_pretrained`` picks it.

    ``auto`` is the config's dtype, else the dtype of the first floating tensor of the first
    checkpoint file.
    """
    if isinstance(requested, torch.dtype):
        return requested
    found = _config_dtype(config)
    if found is not None:
        return found
    for key in sorted(ckpt, key=lambda k: (str(ckpt[k][0]), k)):
        dtype = _ST_DTYPES.get(ckpt[key][1]["dtype"])
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return torch.get_default_dtype()


def _fp32_patterns(model: PreTrainedModel, dtype: torch.dtype) -> list[str]:
    """Module names that ``from_pretrained`` keeps in float32 at this dtype."""
    keep: list[str] = []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return keep


def _tie_groups(model: PreTrainedModel, names: list[str]) -> list[list[str]]:
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


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def _block_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


class LazyLoader:
    """Materialises the decoder blocks of a lazily opened model one at a time.

    Made by :func:`open_lazy`. Attributes:
        model: the model; outside the blocks everything is real (on the CPU).
        blocks: its decoder blocks (``baq.blocks.decoder_layers``).
        prefix: the blocks' name in the model with a trailing dot, e.g. ``"model.layers."``.
        folder: the checkpoint folder.
        dtype: the model's dtype.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        folder: Path,
        prefix: str,
        resident: list[_Slot],
        per_block: list[list[_Slot]],
    ) -> None:
        self.model = model
        self.folder = folder
        self.prefix = prefix
        self.blocks = blocks.decoder_layers(model)
        self.dtype = _config_dtype(model.config) or torch.get_default_dtype()
        self._resident = resident
        self._per_block = per_block
        self._by_name: dict[str, _Slot] = {}
        for slot in [*resident, *(s for slots in per_block for s in slots)]:
            self._by_name.update(dict.fromkeys(slot.names, slot))

    def __len__(self) -> int:
        """Number of decoder blocks."""
        return len(self.blocks)

    def block_nbytes(self, i: int) -> int:
        """Bytes that block ``i``'s checkpoint tensors take once loaded (in the model's dtype)."""
        return sum(slot.nbytes for slot in self._per_block[self._index(i)])

    def resident_nbytes(self) -> int:
        """Bytes of the tensors outside the blocks, read by ``open_lazy`` and always resident."""
        return sum(slot.nbytes for slot in self._resident)

    def is_loaded(self, i: int) -> bool:
        """Whether every checkpoint tensor of block ``i`` is materialised."""
        return not any(self._is_meta(slot) for slot in self._per_block[self._index(i)])

    def load_block(self, i: int, device: torch.device | str = "cpu") -> nn.Module:
        """Read block ``i``'s tensors from disk and put them in the model, on ``device``.

        Only tensors still on meta are read (a loaded block is only moved to ``device``). Every
        tensor is cast as ``from_pretrained`` would (floating tensors to the model's dtype);
        the block's other buffers (non-persistent ones) move to ``device`` too.

        Returns:
            The block (``loader.blocks[i]``).
        """
        i = self._index(i)
        device = torch.device(device)
        self._materialise([slot for slot in self._per_block[i] if self._is_meta(slot)], device)
        block = self.blocks[i]
        block.to(device)
        return block

    def release_block(self, i: int, keep: Callable[[str], bool] | None = None) -> None:
        """Put block ``i``'s checkpoint tensors back on meta, freeing their memory.

        Changes made to the block (quantized weights) are dropped: a later ``load_block``
        reads the checkpoint again. The memory is only freed once the caller holds no other
        reference to the tensors. Buffers that are not in the checkpoint stay real and go back
        to the CPU. Ends with :func:`trim_heap`.

        Args:
            i: block index.
            keep: optional predicate on tensor names relative to the block (e.g.
                ``lambda name: "norm" in name``); tensors it accepts stay materialised, copied
                to the CPU with their current values.
        """
        i = self._index(i)
        block = self.blocks[i]
        local = len(f"{self.prefix}{i}.")
        for slot in self._per_block[i]:
            if self._is_meta(slot):
                continue
            if keep is not None and keep(slot.names[0][local:]):
                # a copy: a tensor read from disk may view the file's mapping of this block
                module, attr = _split(self.model, slot.names[0])
                current = module._parameters[attr] if slot.is_param else module._buffers[attr]
                self._set(slot, current.detach().to("cpu", copy=True))
            else:
                self._set(slot, torch.empty(slot.shape, dtype=slot.dtype, device="meta"))
        for module in block.modules():  # buffers that no checkpoint holds
            for name, buf in module._buffers.items():
                if buf is not None and buf.device.type not in ("meta", "cpu"):
                    module._buffers[name] = buf.cpu()
        trim_heap()

    def to(self, device: torch.device | str) -> None:
        """Move every materialised tensor of the model (the resident part, loaded blocks and
        buffers) to ``device``, keeping tied weights tied; tensors on meta stay there.

        ``model.to(device)`` fails on a model with tensors on meta; use this instead, e.g.
        before a ``streaming`` forward on an accelerator.
        """
        device = torch.device(device)
        moved: dict[int, Tensor] = {}
        old: list[Tensor] = []  # kept alive so that ids stay unique during the walk
        for module in self.model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, t in tensors.items():
                    if t is None or t.device.type == "meta" or t.device == device:
                        continue
                    if id(t) not in moved:
                        old.append(t)
                        if isinstance(t, nn.Parameter):
                            new = nn.Parameter(t.detach().to(device), t.requires_grad)
                        else:
                            new = t.to(device)
                        moved[id(t)] = new
                    tensors[name] = moved[id(t)]
        del old
        trim_heap()

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """Read model tensors by model name from the checkpoint, without touching the model.

        For callers that need the original values of released tensors (e.g. a block's norms
        when saving). Tensors come back on the CPU, cast as ``load_block`` casts them.
        """
        wanted = list(names)
        missing = [name for name in wanted if name not in self._by_name]
        if missing:
            raise KeyError(f"not checkpoint tensors of the model: {', '.join(missing[:5])}")
        slots = {id(self._by_name[n]): self._by_name[n] for n in wanted}
        loaded = self._read(list(slots.values()), torch.device("cpu"))
        # copies: a tensor read from disk may view the whole file's mapping
        return {name: loaded[id(self._by_name[name])].clone() for name in wanted}

    @contextmanager
    def streaming(self, on_load: Callable[[int, nn.Module], None] | None = None) -> Iterator[None]:
        """Inside, a forward of the whole model loads each block just before it runs and
        releases it right after, so a full forward needs one block's memory.

        Blocks are loaded on the device of the input embeddings. Blocks already loaded when
        the context starts are left loaded.

        Args:
            on_load: called as ``on_load(i, block)`` after block ``i`` is loaded, before it
                runs (e.g. to write quantized weights into it).
        """
        device = self.model.get_input_embeddings().weight.device
        handles = []

        def pre(i: int) -> None:
            if self.is_loaded(i):
                return
            self.load_block(i, device)
            streamed.add(i)
            if on_load is not None:
                on_load(i, self.blocks[i])

        def post(i: int) -> None:
            if i in streamed:
                streamed.discard(i)
                self.release_block(i)

        streamed: set[int] = set()
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, i=i: pre(i)))
            handles.append(block.register_forward_hook(lambda m, a, o, i=i: post(i)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for i in sorted(streamed):
                self.release_block(i)

    def _index(self, i: int) -> int:
        if not -len(self.blocks) <= i < len(self.blocks):
            raise IndexError(f"block {i} out of range: the model has {len(self.blocks)} blocks")
        return i % len(self.blocks)

    def _is_meta(self, slot: _Slot) -> bool:
        module, attr = _split(self.model, slot.names[0])
        tensor = module._parameters.get(attr) if slot.is_param else module._buffers.get(attr)
        return tensor is None or tensor.device.type == "meta"

    def _set(self, slot: _Slot, tensor: Tensor) -> None:
        """Install ``tensor`` under every name of ``slot`` (one object, so ties hold)."""
        value = nn.Parameter(tensor, requires_grad=slot.requires_grad) if slot.is_param else tensor
        for name in slot.names:
            module, attr = _split(self.model, name)
            if slot.is_param:
                module._parameters[attr] = value
            else:
                module._buffers[attr] = value

    def _read(self, slots: list[_Slot], device: torch.device) -> dict[int, Tensor]:
        """Read ``slots`` from disk, one ``safe_open`` per file, closed right after (unmapped)."""
        from safetensors import safe_open

        by_file: dict[Path, list[_Slot]] = defaultdict(list)
        for slot in slots:
            by_file[slot.file].append(slot)
        out: dict[int, Tensor] = {}
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for slot in group:
                    tensor = f.get_tensor(slot.key)
                    out[id(slot)] = tensor.to(device=device, dtype=slot.dtype)
                    del tensor
        return out

    def _materialise(self, slots: list[_Slot], device: torch.device) -> None:
        # one file at a time, so that at most the tensors of one block are in flight
        by_file: dict[Path, list[_Slot]] = defaultdict(list)
        for slot in slots:
            by_file[slot.file].append(slot)
        for group in by_file.values():
            loaded = self._read(group, device)
            for slot in group:
                self._set(slot, loaded.pop(id(slot)))


def _plan(
    model: PreTrainedModel,
    ckpt: dict[str, tuple[Path, dict[str, Any]]],
    dtype: torch.dtype,
    prefix: str,
    num_blocks: int,
) -> tuple[list[_Slot], list[list[_Slot]]]:
    """Match every model tensor to a checkpoint tensor; split them into resident and per block."""
    params = dict(model.named_parameters(remove_duplicate=False))
    persistent = {}
    for name, buf in model.named_buffers(remove_duplicate=False):
        module, attr = _split(model, name)
        if attr not in module._non_persistent_buffers_set:
            persistent[name] = buf
    base = getattr(model, "base_model_prefix", "") or ""
    keep_fp32 = _fp32_patterns(model, dtype)
    resident: list[_Slot] = []
    per_block: list[list[_Slot]] = [[] for _ in range(num_blocks)]
    missing: list[str] = []
    for group in _tie_groups(model, [*params, *persistent]):
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
        file, entry = ckpt[key]
        shape = tuple(entry["shape"])
        if shape != tuple(placeholder.shape):
            raise LazyLoadUnsupported(
                f"{key} has shape {shape} in the checkpoint but {tuple(placeholder.shape)} in "
                "the model"
            )
        st_dtype = _ST_DTYPES.get(entry["dtype"])
        if st_dtype is None:
            raise LazyLoadUnsupported(f"{key} has dtype {entry['dtype']}, which torch lacks")
        target = st_dtype
        if st_dtype.is_floating_point:
            fp32 = any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", group[0]) for p in keep_fp32)
            target = torch.float32 if fp32 else dtype
        numel = 1
        for size in shape:
            numel *= size
        slot = _Slot(
            names=group,
            key=key,
            file=file,
            shape=shape,
            dtype=target,
            is_param=is_param,
            requires_grad=bool(getattr(placeholder, "requires_grad", False)),
            nbytes=numel * torch.empty((), dtype=target).element_size(),
        )
        blocks = {_block_index(name, prefix) for name in group}
        if len(blocks) == 1 and None not in blocks:
            per_block[blocks.pop()].append(slot)
        else:
            resident.append(slot)
    if missing:
        raise LazyLoadUnsupported(
            f"{len(missing)} model parameters are not in the checkpoint under their names "
            f"(e.g. {', '.join(missing[:3])}): the checkpoint needs transformers' key conversions"
        )
    return resident, per_block


def _load_generation_config(model: PreTrainedModel, folder: Path) -> None:
    """Read ``generation_config.json`` as ``from_pretrained`` does (``from_config`` only derives
    one from ``config.json``, losing sampling settings that a save would then drop)."""
    if not model.can_generate():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: from config.json, as from_pretrained falls back
        model.generation_config = GenerationConfig.from_pretrained(
            folder, config_file_name="config.json", _from_model_config=True
        )


def open_lazy(
    name_or_path: str | os.PathLike, dtype: str | torch.dtype = "auto", tokenizer: bool = True
) -> tuple[PreTrainedModel, Any, LazyLoader]:
    """Open a local safetensors checkpoint with its decoder blocks left on disk.

    Args:
        name_or_path: a folder for which :func:`can_load_lazily` is True.
        dtype: ``auto`` (the checkpoint's dtype, as ``from_pretrained`` picks it), ``float32``,
            ``bfloat16``, ``float16`` or a ``torch.dtype``. Floating tensors are cast to it.
        tokenizer: also load the tokenizer (else None is returned in its place).
    Returns:
        ``(model, tokenizer, loader)``: the model is in eval mode with ``config.use_cache``
        False, everything outside the decoder blocks on the CPU with the values a full load
        gives, and the blocks' checkpoint tensors on meta. Use ``loader.load_block(i)`` and
        ``loader.release_block(i)`` to walk the blocks.
    Raises:
        LazyLoadUnsupported: the folder or its checkpoint does not qualify; nothing was read
            beyond config and headers, and a full load is the fallback.
    """
    if not can_load_lazily(name_or_path):
        raise LazyLoadUnsupported(
            f"{name_or_path} is not a local folder with config.json and safetensors weights"
        )
    from accelerate import init_empty_weights

    folder = Path(name_or_path).expanduser()
    requested = models.resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:
        raise ValueError(f"cannot read the config of {folder}: {models._one_line(err)}") from err
    ckpt = _checkpoint(folder)
    main_dtype = _main_dtype(requested, config, ckpt)
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except Exception as err:
            fix = ""
            if not models._has_tokenizer_files(folder):
                fix = "; save one next to the model with tokenizer.save_pretrained(folder)"
            raise ValueError(
                f"cannot load the tokenizer of {folder}: {models._one_line(err)}{fix}"
            ) from err
    config._name_or_path = str(folder)
    try:
        # parameters on meta; buffers (rotary inv_freq, masks) are built for real
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=main_dtype)
    except Exception as err:
        raise LazyLoadUnsupported(
            f"cannot build {folder} from its config: {models._one_line(err)}"
        ) from err
    layers = blocks.decoder_layers(model)
    prefix = next((f"{name}." for name, mod in model.named_modules() if mod is layers), None)
    if prefix is None:
        raise LazyLoadUnsupported("decoder blocks are not a submodule of the model")
    resident, per_block = _plan(model, ckpt, main_dtype, prefix, len(layers))
    loader = LazyLoader(model, folder, prefix, resident, per_block)
    # persistent buffers of the blocks that the checkpoint holds wait on meta like parameters
    for slots in per_block:
        for slot in slots:
            if not slot.is_param:
                loader._set(slot, torch.empty(slot.shape, dtype=slot.dtype, device="meta"))
    loader._materialise(resident, torch.device("cpu"))
    _load_generation_config(model, folder)
    model.eval()
    model.config.use_cache = False
    log.info(
        "opened %s lazily (dtype=%s): %.1f MiB resident, %.1f MiB per block",
        folder,
        str(main_dtype).replace("torch.", ""),
        loader.resident_nbytes() / 2**20,
        (loader.block_nbytes(0) if len(loader) else 0) / 2**20,
    )
    return model, tok, loader

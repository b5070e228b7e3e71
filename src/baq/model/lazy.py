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

Local folders written by ``save_pretrained`` with safetensors weights (``model.safetensors``
or shards listed in ``model.safetensors.index.json``) qualify, and local GGUF files, whose blocks
are dequantized when read (:mod:`baq.model.lazy_gguf`); ``can_load_lazily`` says whether
a model argument does, and ``open_lazy`` raises :class:`LazyLoadUnsupported` (before reading any
weight) when the checkpoint's names or shapes do not match the model, so that callers can fall
back to ``baq.model.loader.load_model``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from baq.errors import one_line
from baq.model import blocks
from baq.model import loader as models
from baq.model.checkpoint_map import (
    INDEX_FILE,
    SINGLE_FILE,
    LazyLoadUnsupported,
    Slot,
    checkpoint_tensors,
    config_dtype,
    main_dtype,
    map_checkpoint,
    split_name,
)
from baq.model.lazy_gguf import GgufTensors, gguf_location

log = logging.getLogger(__name__)

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


def can_load_lazily(name_or_path: str | os.PathLike | None, gguf_file: str | None = None) -> bool:
    """Whether a model argument names a local checkpoint that ``open_lazy`` can read.

    True for a folder with ``config.json`` and ``model.safetensors`` or
    ``model.safetensors.index.json``, and for a local GGUF file (a ``.gguf`` path, a folder
    with ``gguf_file``, or None: the reference model). False for hub ids and folders with
    ``.bin`` weights only. Cheap: it only looks at file names. ``open_lazy`` may still raise
    :class:`LazyLoadUnsupported` (checkpoint names that need transformers' key conversions,
    remote code, GGUF architectures whose tensors are renamed while loading): fall back to the
    full load then.
    """
    if gguf_location(name_or_path, gguf_file) is not None:
        return True
    if name_or_path is None or gguf_file is not None or str(name_or_path).endswith(".gguf"):
        return False
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


class LazyLoader:
    """Materialises the decoder blocks of a lazily opened model one at a time.

    Made by :func:`open_lazy`. Attributes:
        model: the model; outside the blocks everything is real (on the CPU).
        blocks: its decoder blocks (``baq.model.blocks.decoder_layers``).
        prefix: the blocks' name in the model with a trailing dot, e.g. ``"model.layers."``.
        folder: the checkpoint folder (the file, for a GGUF).
        dtype: the model's dtype.

    ``source`` reads slots instead of ``safetensors`` (a :class:`GgufTensors`' ``read``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        folder: Path,
        prefix: str,
        resident: list[Slot],
        per_block: list[list[Slot]],
        source: Callable[[list[Slot], torch.device], dict[int, Tensor]] | None = None,
    ) -> None:
        self.model = model
        self._source = source
        self.folder = folder
        self.prefix = prefix
        self.blocks = blocks.decoder_layers(model)
        self.dtype = config_dtype(model.config) or torch.get_default_dtype()
        self._resident = resident
        self._per_block = per_block
        self._by_name: dict[str, Slot] = {}
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
                module, attr = split_name(self.model, slot.names[0])
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

    def _is_meta(self, slot: Slot) -> bool:
        module, attr = split_name(self.model, slot.names[0])
        tensor = module._parameters.get(attr) if slot.is_param else module._buffers.get(attr)
        return tensor is None or tensor.device.type == "meta"

    def _set(self, slot: Slot, tensor: Tensor) -> None:
        """Install ``tensor`` under every name of ``slot`` (one object, so ties hold)."""
        value = nn.Parameter(tensor, requires_grad=slot.requires_grad) if slot.is_param else tensor
        for name in slot.names:
            module, attr = split_name(self.model, name)
            if slot.is_param:
                module._parameters[attr] = value
            else:
                module._buffers[attr] = value

    def _read(self, slots: list[Slot], device: torch.device) -> dict[int, Tensor]:
        """Read ``slots`` from disk, one ``safe_open`` per file, closed right after (unmapped)."""
        if self._source is not None:
            return self._source(slots, device)
        from safetensors import safe_open

        by_file: dict[Path, list[Slot]] = defaultdict(list)
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

    def _materialise(self, slots: list[Slot], device: torch.device) -> None:
        # one file at a time, so that at most the tensors of one block are in flight
        by_file: dict[Path, list[Slot]] = defaultdict(list)
        for slot in slots:
            by_file[slot.file].append(slot)
        for group in by_file.values():
            loaded = self._read(group, device)
            for slot in group:
                self._set(slot, loaded.pop(id(slot)))


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
    name_or_path: str | os.PathLike | None,
    dtype: str | torch.dtype = "auto",
    tokenizer: bool = True,
    gguf_file: str | None = None,
) -> tuple[PreTrainedModel, Any, LazyLoader]:
    """Open a local safetensors checkpoint or GGUF file with its decoder blocks left on disk.

    Args:
        name_or_path: a folder or ``.gguf`` file for which :func:`can_load_lazily` is True
            (None: the reference model's GGUF).
        dtype: ``auto`` (the checkpoint's dtype, as ``from_pretrained`` picks it), ``float32``,
            ``bfloat16``, ``float16`` or a ``torch.dtype``. Floating tensors are cast to it.
        tokenizer: also load the tokenizer (else None is returned in its place).
        gguf_file: a GGUF file name inside the ``name_or_path`` folder.
    Returns:
        ``(model, tokenizer, loader)``: the model is in eval mode with ``config.use_cache``
        False, everything outside the decoder blocks on the CPU with the values a full load
        gives, and the blocks' checkpoint tensors on meta. Use ``loader.load_block(i)`` and
        ``loader.release_block(i)`` to walk the blocks.
    Raises:
        LazyLoadUnsupported: the folder or its checkpoint does not qualify; nothing was read
            beyond config and headers, and a full load is the fallback.
    """
    if not can_load_lazily(name_or_path, gguf_file):
        raise LazyLoadUnsupported(
            f"{name_or_path} is not a local folder with config.json and safetensors weights, "
            "nor a local GGUF file"
        )
    from accelerate import init_empty_weights

    gguf = gguf_location(name_or_path, gguf_file)
    folder = Path(gguf[0] if gguf else name_or_path).expanduser()  # type: ignore[arg-type]
    requested = models.resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    if gguf is not None:  # config and tokenizer as from_pretrained(folder, gguf_file=...)
        config = models.load_config(*gguf)
        tok = models.load_tokenizer(*gguf) if tokenizer else None
        # from_pretrained's "auto" for a GGUF: the config's dtype, else the default (float32)
        model_dtype = main_dtype(requested, config, {})
    else:
        config, tok, ckpt = _folder_config(folder, tokenizer)
        model_dtype = main_dtype(requested, config, ckpt)
    config._name_or_path = str(folder)
    try:
        # parameters on meta; buffers (rotary inv_freq, masks) are built for real
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=model_dtype)
    except Exception as err:
        raise LazyLoadUnsupported(
            f"cannot build {folder} from its config: {one_line(err)}"
        ) from err
    layers = blocks.decoder_layers(model)
    prefix = next((f"{name}." for name, mod in model.named_modules() if mod is layers), None)
    if prefix is None:
        raise LazyLoadUnsupported("decoder blocks are not a submodule of the model")
    source = None
    if gguf is not None:
        gguf_tensors = GgufTensors(folder / gguf[1], model, model_dtype)
        ckpt, source, folder = gguf_tensors.checkpoint(), gguf_tensors.read, folder / gguf[1]
    resident, per_block = map_checkpoint(model, ckpt, model_dtype, prefix, len(layers))
    loader = LazyLoader(model, folder, prefix, resident, per_block, source)
    # persistent buffers of the blocks that the checkpoint holds wait on meta like parameters
    for slots in per_block:
        for slot in slots:
            if not slot.is_param:
                loader._set(slot, torch.empty(slot.shape, dtype=slot.dtype, device="meta"))
    loader._materialise(resident, torch.device("cpu"))
    if gguf is None:  # from_pretrained reads no generation_config.json next to a GGUF
        _load_generation_config(model, folder)
    model.eval()
    model.config.use_cache = False
    log.info(
        "opened %s lazily (dtype=%s): %.1f MiB resident, %.1f MiB per block",
        folder,
        str(model_dtype).replace("torch.", ""),
        loader.resident_nbytes() / 2**20,
        (loader.block_nbytes(0) if len(loader) else 0) / 2**20,
    )
    return model, tok, loader


def _folder_config(folder: Path, tokenizer: bool) -> tuple[Any, Any, dict]:
    """Config, tokenizer (or None) and safetensors headers of a checkpoint folder."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:
        raise ValueError(f"cannot read the config of {folder}: {one_line(err)}") from err
    ckpt = checkpoint_tensors(folder)
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except Exception as err:
            fix = ""
            if not models.has_tokenizer_files(folder):
                fix = "; save one next to the model with tokenizer.save_pretrained(folder)"
            raise ValueError(
                f"cannot load the tokenizer of {folder}: {one_line(err)}{fix}"
            ) from err
    return config, tok, ckpt

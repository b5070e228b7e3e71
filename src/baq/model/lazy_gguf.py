"""Lazy loading of a GGUF file: which GGUF tensor fills which model tensor, and reading a block's.

transformers loads a GGUF whole (``load_gguf_checkpoint``): every tensor is dequantized to float32
with ``gguf.dequantize``, passed through the architecture's ``TensorProcessor`` (for Llama the
reverse permutation of the q and k rows, for Gemma the ``norm - 1``), renamed with
``get_gguf_hf_weights_map`` and cast to the model's dtype. :class:`GgufTensors` does the same,
with the same transformers functions, one tensor at a time: the file's tensor table is read once
(``gguf.GGUFReader``), and each tensor's bytes are mapped from the file only while the block that
needs them is read, so the resident set is the part outside the blocks plus one block, not the
dequantized model.

Architectures whose processor renames tensors or splits one GGUF tensor into several (the
mixture-of-experts ones) and those transformers loads through its newer packed GGUF path are
refused with :class:`~baq.model.checkpoint_map.LazyLoadUnsupported`, before any weight is read:
the caller then loads the file whole.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel

from baq.model import loader as models
from baq.model.checkpoint_map import Checkpoint, LazyLoadUnsupported, Slot

log = logging.getLogger(__name__)


def gguf_location(
    name_or_path: str | os.PathLike | None, gguf_file: str | None = None
) -> tuple[str, str] | None:
    """``(folder, file name)`` of a local GGUF model argument, or None when it names none.

    A ``.gguf`` path, a folder with ``gguf_file`` in it, or None (the reference model, when
    installed). Only file names are looked at.
    """
    if name_or_path is None:
        if gguf_file is not None:
            return None
        try:
            return models.reference_model_path()
        except FileNotFoundError:
            return None
    path = Path(name_or_path).expanduser()
    if gguf_file is not None:
        return (str(path), gguf_file) if (path / gguf_file).is_file() else None
    if str(name_or_path).endswith(".gguf") and path.is_file():
        return str(path.parent), path.name
    return None


@dataclass(frozen=True)
class GgufTensor:
    """Where one GGUF tensor's bytes are, as ``GGUFReader`` found them."""

    name: str  # the GGUF name, e.g. ``blk.0.attn_q.weight``
    qtype: int  # ggml type
    offset: int  # from the start of the file
    raw_dtype: np.dtype  # the reader's view of the bytes
    raw_shape: tuple[int, ...]
    shape: tuple[int, ...]  # once dequantized (numpy order, the model's)


# architectures whose transformers processor stores a tensor under a name of its own
_RENAMED_WHILE_LOADING = {"gpt2"}


def _packed_path_archs() -> set[str]:
    """GGUF architectures that transformers loads through its packed path (not the one here)."""
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:  # older transformers: every architecture takes load_gguf_checkpoint
        return set()
    return set(GGUF_ARCHS)


class GgufTensors:
    """The tensors of one GGUF file under the model names transformers gives them.

    Args:
        path: the GGUF file.
        model: the model skeleton (on meta) the file is loaded into.
        dtype: the model's dtype; tensors are cast to it (then to their slot's dtype), as
            ``load_gguf_checkpoint(torch_dtype=...)`` and the load after it cast them.
    """

    def __init__(self, path: Path, model: PreTrainedModel, dtype: torch.dtype) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = path
        self.dtype = dtype
        reader = GGUFReader(path)
        arch = (read_field(reader, "general.architecture") or ["?"])[0]
        if arch in _RENAMED_WHILE_LOADING:
            raise LazyLoadUnsupported(
                f"{path.name}: GGUF architecture {arch!r} moves its output head to another name "
                "while loading, which is not read lazily"
            )
        if arch in _packed_path_archs():
            raise LazyLoadUnsupported(
                f"{path.name}: transformers loads GGUF architecture {arch!r} through its packed "
                "path, which is not read lazily"
            )
        processor_class = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        for method in ("preprocess_name", "perform_fallback_tensor_mapping"):
            if getattr(processor_class, method) is not getattr(TensorProcessor, method):
                raise LazyLoadUnsupported(
                    f"{path.name}: GGUF architecture {arch!r} renames or splits tensors while "
                    "loading (mixture of experts), which is not read lazily"
                )
        # the config dict transformers hands its processor (the heads, for the q/k permutation)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        self._config = parsed.get("config", {})
        self._processor = processor_class(config=self._config)
        self._key_map: dict[str, str] = get_gguf_hf_weights_map(model, self._processor)
        self._by_model_name: dict[str, GgufTensor] = {}
        for t in reader.tensors:
            model_name = self._key_map.get(t.name)
            if model_name is None:
                continue  # a tensor the model has no place for (rope_freqs): the full load skips it
            self._by_model_name[model_name] = GgufTensor(
                name=t.name,
                qtype=int(t.tensor_type),
                offset=int(t.data_offset),
                raw_dtype=t.data.dtype,
                raw_shape=tuple(int(d) for d in t.data.shape),
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
            )
        del reader  # drops the file's mapping: blocks map their own bytes when read

    def checkpoint(self) -> Checkpoint:
        """Model tensor name -> (file, dtype name, shape), the form ``map_checkpoint`` takes.

        Every tensor counts as float32, which ``gguf.dequantize`` gives.
        """
        return {name: (self.path, "F32", t.shape) for name, t in self._by_model_name.items()}

    def read(self, slots: list[Slot], device: torch.device) -> dict[int, Tensor]:
        """Dequantize ``slots`` (keyed by model name) from the file, as the full load does."""
        from gguf import dequantize

        out: dict[int, Tensor] = {}
        for slot in slots:
            info = self._by_model_name[slot.key]
            raw = np.memmap(
                self.path, dtype=info.raw_dtype, mode="r", offset=info.offset, shape=info.raw_shape
            )
            weights = dequantize(raw, info.qtype)
            result = self._processor.process(
                weights=weights,
                name=info.name,
                tensor_key_mapping=self._key_map,
                parsed_parameters={"config": self._config, "tensors": {}},
            )
            if result.name != info.name:
                raise LazyLoadUnsupported(f"{info.name} is renamed while loading")
            # a copy, as transformers makes: an F32 tensor would otherwise view the file
            tensor = torch.from_numpy(np.copy(result.weights)).to(self.dtype)
            out[id(slot)] = tensor.to(device=device, dtype=slot.dtype)
            del raw, weights, result, tensor
        return out

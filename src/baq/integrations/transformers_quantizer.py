"""baq in transformers' quantizer registry: ``AutoModelForCausalLM.from_pretrained(folder)``.

Registered from ``import baq`` through :mod:`baq.integrations.transformers_register` (lazily: this
module imports
transformers). A saved folder (docs/FORMAT.md) then loads with transformers' own
``from_pretrained``, pipelines included, with the checks of :func:`baq.load`:

* before the weights load, the manifest (sizes, SHA-256 of every file), the format version, the
  header of ``quantized.safetensors`` and the tensor names of ``model.safetensors`` are checked,
  and every packed linear is replaced by a :class:`PackedSlot`, which holds only the layer's bias,
  so transformers loads ``model.safetensors`` (the unquantized tensors) as for any model and never
  sees, initialises or overwrites the packed codes;
* after the weights load, each slot becomes the :class:`~baq.saved.packed_linear.PackedLinear` read
  from ``quantized.safetensors`` (every layer's tensors checked, as in :func:`baq.load`), and
  ``save_pretrained`` of the model writes a baq folder (:func:`baq.saved.storage.save_packed`).

transformers' quantizer hooks have changed between releases; the ones overridden here are looked
up by what the installed version passes (the checkpoint files, or the config's path).
"""

from __future__ import annotations

import logging
import os
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from baq.config import DEFAULT_CACHE
from baq.saved.manifest import CONFIG_FILE, DENSE_FILE, FORMAT, MANIFEST_FILE, NEEDS_BAQ

log = logging.getLogger(__name__)


class BaqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a saved folder (docs/FORMAT.md, section 3), verbatim.

    Every key of the block is an attribute, so ``to_dict()`` (what ``save_pretrained`` writes)
    gives the block back unchanged; except a key that would hide one of the config's own
    attributes (``to_dict``, ``update``, ``__class__``, any ``_`` name), which no baq save
    writes: it is dropped with a warning, as :func:`baq.load` ignores the block.
    """

    def __init__(self, /, quant_method: str = FORMAT, **fields: Any) -> None:
        self.quant_method = quant_method
        hiding = sorted(k for k in fields if k.startswith("_") or hasattr(type(self), k))
        if hiding:
            log.warning(
                "quantization_config keys ignored (they would hide the config's own "
                "attributes; baq writes none of them): %s",
                ", ".join(hiding),
            )
        self.__dict__.update({k: v for k, v in fields.items() if k not in hiding})


class PackedSlot(nn.Module):
    """Placeholder of a packed linear while transformers loads the unquantized tensors.

    Its only parameter is the layer's bias (so transformers loads ``N.bias`` from
    ``model.safetensors``); it has no weight to initialise and never runs a forward: it is
    replaced by the :class:`~baq.saved.packed_linear.PackedLinear` after loading.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        bias = getattr(module, "bias", None)
        self.bias = bias if isinstance(bias, nn.Parameter) else None
        # a plain attribute, not a parameter: nothing to load, but a parent's weight init (GPT-2
        # initialises c_proj.weight from its attention module) finds a meta tensor to no-op on
        self.weight = torch.empty(module.weight.shape, device="meta")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a baq packed layer was not loaded: from_pretrained did not finish")


def _strip_marker(config: Any) -> Any:
    """Drop the ``transformers_weights`` marker that stops baq-less loads (storage.mark_config)."""
    if getattr(config, "transformers_weights", None) == NEEDS_BAQ:
        del config.transformers_weights
    return config


class BaqHfQuantizer(HfQuantizer):
    """Loads a saved baq folder inside ``from_pretrained``: packed linears, checked files.

    Only pre-quantized folders: quantizing on the fly needs calibration (``baq quantize``).
    """

    requires_calibration = True

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._root: Path | None = None
        self._layers: dict[str, dict] = {}
        self._tied: dict[str, str] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("baq: disk offload of packed layers is not supported; use more RAM")

    # the config hook of this transformers version (5.x: attention, 4.5x: tensor parallel plan);
    # both run before the checkpoint files are resolved from the config
    def update_attn_implementation(self, config: Any) -> Any:
        return _strip_marker(super().update_attn_implementation(config))

    def update_tp_plan(self, config: Any) -> Any:
        parent = getattr(super(), "update_tp_plan", None)
        return _strip_marker(parent(config) if parent else config)

    def _folder(self, model: Any, checkpoint_files: list[str] | None) -> Path:
        if checkpoint_files:
            root = Path(checkpoint_files[0]).parent
        else:
            root = Path(str(getattr(model.config, "_name_or_path", "")))
        if not (root / MANIFEST_FILE).is_file():
            source = getattr(model.config, "_name_or_path", root)
            if not os.path.isdir(str(source)):
                raise ValueError(
                    f"{source}: baq loads local folders only; download the whole repository "
                    "first (huggingface-cli download REPO --local-dir DIR) and load DIR"
                )
        return root

    def _process_model_before_weight_loading(
        self, model: Any, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> Any:
        from baq.saved import loading
        from baq.saved.manifest import (
            StorageError,
            check_version,
            index_of,
            merged_info,
            verify_manifest,
            weight_files,
            weight_headers,
        )

        root = self._folder(model, checkpoint_files)
        manifest = verify_manifest(root)
        qc = self.quantization_config
        check_version(
            root / CONFIG_FILE, qc.quant_method, getattr(qc, "format_version", None), "quant_method"
        )
        # transformers reads the files it resolved: they must be the ones the manifest lists
        dense_files = weight_files(root, DENSE_FILE, manifest["files"])
        if checkpoint_files:
            unlisted = sorted({Path(f).name for f in checkpoint_files} - set(dense_files))
            if unlisted or {Path(f).parent for f in checkpoint_files} != {root}:
                raise StorageError(
                    f"{root}: transformers would load {(unlisted or checkpoint_files)[0]}, which "
                    f"{MANIFEST_FILE} does not list as a weight file"
                )
        # shapes against the config and the load's memory, before anything is allocated
        layers, _ = loading.check_folder(root, model, manifest, DEFAULT_CACHE)
        for name in layers:
            model.set_submodule(name, PackedSlot(model.get_submodule(name)))
        # transformers would quietly initialise a tensor the dense files lack: check the names
        header = merged_info(weight_headers(root, DENSE_FILE, manifest["files"]))
        stored, expected = set(header), set(model.state_dict()) - set(manifest["tied"])
        where = root / (dense_files[0] if len(dense_files) == 1 else index_of(DENSE_FILE))
        for what, names in (("missing", expected - stored), ("unexpected", stored - expected)):
            if names:
                raise StorageError(f"{where}: tensor {min(names)} is {what}")
        self._root, self._layers, self._tied = root, layers, manifest["tied"]
        _untie_packed(
            model, {a for a, t in self._tied.items() if t.removesuffix(".weight") in layers}
        )
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from baq.saved import loading
        from baq.saved.manifest import StorageError

        root = self._root
        devices = {name: _device_near(model, name) for name in self._layers}

        def take_bias(name: str, slot: Any) -> Any:
            if slot.bias is None:
                return None
            if slot.bias.device.type == "meta":
                raise StorageError(f"{root}: dense tensor {name}.bias is missing")
            return slot.bias.detach()

        loading.install_packed(root, model, self._layers, take_bias, DEFAULT_CACHE)
        for name, device in devices.items():
            model.get_submodule(name).to(device)
        loading.tie_aliases(model, root, self._tied)
        model.save_pretrained = types.MethodType(save_pretrained, model)
        log.info("loaded %d packed layers from %s", len(self._layers), root)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def _dequantize(self, model: Any, dtype: Any = None) -> Any:
        from baq.saved.export import dequantize_model

        model.__dict__.pop("save_pretrained", None)  # a dense model saves the transformers way
        return dequantize_model(model, dtype)


def _untie_packed(model: Any, aliases: set[str]) -> None:
    """Keep transformers from tying, initialising or reporting as missing the tensors that are
    tied to a packed layer (a tied input embedding of a packed head): they are not in
    model.safetensors, and :func:`baq.saved.loading.tie_aliases` fills them after loading."""
    if not aliases:
        return
    mapping = getattr(model, "all_tied_weights_keys", None)
    if isinstance(mapping, dict):
        for target, source in list(mapping.items()):
            if target in aliases or source in aliases:
                del mapping[target]
    ignored = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    model._keys_to_ignore_on_load_missing = ignored + [f"^{re.escape(a)}$" for a in aliases]


def _device_near(model: Any, name: str) -> Any:
    """The device of the closest loaded tensor around ``name`` (its bias, else its parents')."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:i]))
        for t in module.parameters():
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def save_pretrained(
    self: Any,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    max_shard_size: int | str | None = None,
    **kwargs: Any,
) -> None:
    """``model.save_pretrained`` of a model loaded through this quantizer: a baq folder.

    Written atomically by :func:`baq.saved.storage.save_packed` (quantized.safetensors, manifest,
    model card); ``save_directory`` may be new, empty or a previous baq save (replaced), never
    another folder. ``max_shard_size`` shards the weight files as transformers does (None: baq's
    default, ``"5GB"``); transformers' serialization options do not apply and are ignored; the
    tokenizer is saved as usual with ``tokenizer.save_pretrained``, after this.
    """
    from baq.saved.packed_linear import PackedLinear
    from baq.saved.shards import DEFAULT_MAX_SHARD_SIZE, parse_shard_size
    from baq.saved.storage import save_packed

    size = DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
    parse_shard_size(size)  # a bad size fails before anything else
    if not is_main_process:
        return
    if push_to_hub:
        raise ValueError(
            "baq: push_to_hub is not supported; save the folder, then upload it with "
            "huggingface_hub.upload_folder"
        )
    if kwargs.get("state_dict") is not None:
        raise ValueError("baq: save_pretrained(state_dict=...) is not supported for packed models")
    ignored = sorted(k for k, v in kwargs.items() if v is not None and k != "state_dict")
    if ignored:
        log.info("save_pretrained options ignored for a baq model: %s", ", ".join(ignored))
    packed = {n: m for n, m in self.named_modules() if isinstance(m, PackedLinear)}
    qconfig = self.config.quantization_config
    qconfig = qconfig.to_dict() if hasattr(qconfig, "to_dict") else dict(qconfig)
    save_packed(save_directory, self, None, packed, qconfig, force=True, max_shard_size=size)


def register() -> None:
    """Add ``baq`` to transformers' registries (idempotent)."""
    configs = hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING
    quantizers = hf_auto.AUTO_QUANTIZER_MAPPING
    if configs.get(FORMAT) is not BaqConfig:
        configs.pop(FORMAT, None)
        hf_auto.register_quantization_config(FORMAT)(BaqConfig)
    if quantizers.get(FORMAT) is not BaqHfQuantizer:
        quantizers.pop(FORMAT, None)
        hf_auto.register_quantizer(FORMAT)(BaqHfQuantizer)

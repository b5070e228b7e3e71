"""Loading a saved packed folder (docs/FORMAT.md) as a transformers model with
:class:`PackedLinear` layers: by :func:`load_quantized` and by transformers' ``from_pretrained``
(hf_quantizer.py, through :func:`install_packed` and :func:`tie_aliases`). Saving is storage.py;
integrity (the manifest, format versions) is manifest.py.

Every load verifies the manifest first and fails with one line naming the file (``StorageError``),
never with silently wrong weights; then, before any weight is allocated, checks the stored shapes
against config.json and the memory the load will take against what is available
(:func:`check_folder`, load_memory.py). Weight files may be sharded (headers.weight_files).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from baq.config import DEFAULT_CACHE, WEIGHT_CACHES
from baq.errors import one_line
from baq.model import blocks, loader
from baq.saved.load_memory import admit_load, estimate_load
from baq.saved.manifest import (
    CARD_FILE,
    CONFIG_FILE,
    DENSE_FILE,
    MANIFEST_FILE,
    NEEDS_BAQ,
    QUANTIZED_FILE,
    StorageError,
    check_version,
    index_of,
    is_weight_name,
    listed_files,
    merged_info,
    packed_layers,
    read_json,
    verify_manifest,
    weight_headers,
)
from baq.saved.packed_linear import PackedLinear
from baq.saved.packing import range_groups, read_layer

# any of these listed makes a folder have a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise StorageError(f"{path}: not a readable safetensors file ({one_line(err)})") from err


def _load_dense(root: Path, files: list[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The unquantized tensors of every dense file (weight_headers checked each is in one)."""
    dense: dict[str, Tensor] = {}
    for rel in files:
        for key, t in _load_tensors(root / rel).items():
            cast = dtype is not None and t.is_floating_point()
            dense[key] = t.to(dtype) if cast else t
    return dense


def _load_config(root: Path) -> Any:
    from transformers import AutoConfig

    data = read_json(root / CONFIG_FILE, "the model config")
    qc = data.get("quantization_config")
    if not isinstance(qc, dict):
        raise StorageError(f"{root / CONFIG_FILE}: no quantization_config: not a baq model folder")
    check_version(
        root / CONFIG_FILE, qc.get("quant_method"), qc.get("format_version"), "quant_method"
    )
    try:
        config = AutoConfig.from_pretrained(root)
    except Exception as err:
        raise StorageError(f"{root / CONFIG_FILE}: {one_line(err)}") from err
    # transformers would look for a quantizer named "baq"; the packed layers are ours to build
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "transformers_weights", None) == NEEDS_BAQ:
        del config.transformers_weights
    return config


def load_quantized(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    cache: str = DEFAULT_CACHE,
) -> tuple[nn.Module, Any]:
    """Load a saved folder as a transformers model with :class:`PackedLinear` quantized linears.

    The skeleton is built on the meta device and the stored tensors are assigned into it, so the
    float model is never allocated twice.

    Args:
        path: folder written by :func:`save_quantized`.
        device: where the model goes.
        dtype: cast the unquantized floating tensors (and the compute) to this dtype; None keeps
            the stored dtypes.
        cache: what each quantized linear keeps between forwards: ``"kernel"`` (the default,
            :data:`~baq.config.DEFAULT_CACHE`: about the packed size, the fused CPU kernel),
            ``"codes"`` (one byte per weight), ``"none"`` (least memory,
            unpacks on every forward: slow) or ``"weight"`` (the float model's memory and
            speed); see :class:`PackedLinear`.
    Returns:
        ``(model, tokenizer)``: the model in eval mode, ready for ``generate``; the tokenizer, or
        None if the folder has none.
    Raises:
        StorageError: missing, truncated, corrupted or hand-edited files, wrong format version.
    """
    if cache not in WEIGHT_CACHES:
        raise ValueError(f"cache={cache!r}: use one of {', '.join(WEIGHT_CACHES)}")
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    root = Path(path)
    manifest = verify_manifest(root)
    config = _load_config(root)
    if isinstance(dtype, str):
        dtype = loader.resolve_dtype(dtype)
        dtype = None if dtype == "auto" else dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    layers, dense_files = check_folder(root, model, manifest, cache, dtype)
    dense = _load_dense(root, dense_files, dtype)
    dense_file = root / (dense_files[0] if len(dense_files) == 1 else index_of(DENSE_FILE))

    def take_bias(name: str, module: nn.Module) -> Tensor | None:
        if getattr(module, "bias", None) is None:
            return None
        bias = dense.pop(f"{name}.bias", None)
        if bias is None:
            raise StorageError(f"{dense_file}: tensor {name}.bias is missing")
        return bias

    install_packed(root, model, layers, take_bias, cache)
    result = model.load_state_dict(dense, strict=False, assign=True)
    if result.unexpected_keys:
        raise StorageError(f"{dense_file}: unexpected tensor {result.unexpected_keys[0]}")
    tie_aliases(model, root, manifest["tied"], dtype)
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise StorageError(f"{dense_file}: tensor {key} is missing")
    listed = set(manifest["files"])
    _load_generation_config(model, root, listed)
    model.eval()
    model.to(device)
    return model, _load_tokenizer(root, listed)


def packed_layers_meta(root: Path) -> dict[str, dict]:
    """The checked ``layers`` metadata of a folder's quantized file or shards (headers only)."""
    return packed_layers(root, weight_headers(root, QUANTIZED_FILE, listed_files(root)))


def check_folder(
    root: Path, model: nn.Module, manifest: dict, cache: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, dict], list[str]]:
    """Everything about a verified folder that can be checked before a weight is allocated.

    The headers (of every shard) against the model skeleton built from config.json: packed
    layers, dense tensors and tied aliases of the shapes the config gives; then the memory the
    load will take (load_memory.py) against the available memory.

    Args:
        root: the folder; ``manifest`` its verified manifest.
        model: the skeleton (on the meta device; packed layers may already be slots).
        cache: the PackedLinear cache the load will use.
        dtype: the load's float dtype (None: as stored).
    Returns:
        ``(layers, dense_files)``: the ``layers`` metadata (each with its ``file``) and the
        files holding the dense tensors.
    Raises:
        StorageError: one line naming the file, or the folder and the memory it asks for.
    """
    listed = manifest["files"]
    qheaders = weight_headers(root, QUANTIZED_FILE, listed)
    dheaders = weight_headers(root, DENSE_FILE, listed)
    layers = packed_layers(root, qheaders)
    check_layer_shapes(root, model, layers)
    dense = merged_info(dheaders)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
    where = {k: rel for rel, (_, info) in dheaders.items() for k in info}
    for key, (_, shape, _) in dense.items():
        if key not in shapes:
            raise StorageError(f"{root / where[key]}: unexpected tensor {key}")
        if tuple(shape) != shapes[key]:
            raise StorageError(
                f"{root / where[key]}: tensor {key} has shape {tuple(shape)}, config.json "
                f"gives {shapes[key]}: the config does not belong to these weights"
            )
    for alias, stored in manifest["tied"].items():
        owner = stored.removesuffix(".weight")
        if owner in layers and alias in shapes and shapes[alias] != layers[owner]["shape"]:
            raise StorageError(
                f"{root / MANIFEST_FILE}: {alias} has shape {shapes[alias]}, the packed weight "
                f"it is tied to {layers[owner]['shape']}"
            )
    itemsize = None if dtype is None else torch.empty((), dtype=dtype).element_size()
    qinfo = merged_info(qheaders)
    estimates = {
        c: estimate_load(layers, qinfo, dense, manifest["tied"], c, itemsize) for c in WEIGHT_CACHES
    }
    admit_load(root, estimates, cache)
    return layers, list(dheaders)


def check_layer_shapes(root: Path, model: nn.Module, layers: dict[str, dict]) -> None:
    """Every packed layer names a linear of ``model`` with the stored (rows, cols) shape."""
    modules = dict(model.named_modules())
    for name, m in layers.items():
        qpath = root / m.get("file", QUANTIZED_FILE)
        module = modules.get(name)
        if module is None:
            raise StorageError(f"{qpath}: layer {name} is not a module of {type(model).__name__}")
        shape = tuple(blocks.get_weight(module).shape)
        if shape != m["shape"]:
            raise StorageError(f"{qpath}: layer {name} has shape {m['shape']}, the model {shape}")


def install_packed(
    root: Path,
    model: nn.Module,
    layers: dict[str, dict],
    take_bias: Any,
    cache: str,
) -> None:
    """Replace each layer of ``layers`` in ``model`` by its :class:`PackedLinear`.

    Reads quantized.safetensors whole and checks every layer's tensors (docs/FORMAT.md, section
    10); a tensor left over is an error.

    Args:
        root: the saved folder (its manifest already verified).
        model: the model whose modules are replaced in place (``check_layer_shapes`` passed).
        layers: :func:`packed_layers_meta` of the folder.
        take_bias: ``(name, module) -> Tensor | None``, the bias of the layer being replaced.
        cache: the :class:`PackedLinear` cache.
    """
    by_file: dict[str, list[str]] = {}
    for name, m in layers.items():
        by_file.setdefault(m.get("file", QUANTIZED_FILE), []).append(name)
    for rel, names in by_file.items():  # one file (shard) in memory at a time
        qpath = root / rel
        qtensors = _load_tensors(qpath)
        for name in names:
            m = layers[name]
            shape = m["shape"]
            bias = take_bias(name, model.get_submodule(name))
            try:
                ngroups = range_groups(shape, m["group_size"], m["dim"])
                packed, lo, hi = read_layer(name, qtensors, shape, ngroups, m["dim"])
            except ValueError as err:
                raise StorageError(f"{qpath}: {err}") from None
            layer = PackedLinear(packed, lo, hi, m["group_size"], m["sym"], bias, cache, m["dim"])
            model.set_submodule(name, layer)
        if qtensors:
            raise StorageError(f"{qpath}: unexpected tensor {sorted(qtensors)[0]}")


def tie_aliases(
    model: nn.Module, root: Path, tied: dict[str, str], dtype: torch.dtype | None = None
) -> None:
    """Point every alias of the manifest's ``tied`` at the tensor it names.

    An alias of a packed layer's weight ``N.weight`` (a tied input embedding) gets that layer's
    dequantized weight (docs/FORMAT.md, section 8) as a parameter of its own, in ``dtype``
    (None: the alias's dtype in the model skeleton, the model's), and is listed in the layer's
    ``aliases`` so that a save of the model stores it packed once again.
    """
    for alias, stored in tied.items():
        owner = stored.rpartition(".")[0]
        layer = model.get_submodule(owner) if _has_module(model, owner) else None
        if isinstance(layer, PackedLinear) and stored == f"{owner}.weight":
            _tie_packed(model, alias, layer, dtype, root)
        else:
            _tie(model, alias, stored, root)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _tie_packed(
    model: nn.Module, alias: str, layer: PackedLinear, dtype: torch.dtype | None, root: Path
) -> None:
    owner, _, attr = alias.rpartition(".")
    try:
        module = model.get_submodule(owner)
        current = getattr(module, attr)
    except AttributeError as err:
        raise StorageError(f"{root / MANIFEST_FILE}: cannot tie {alias} to {owner}") from err
    shape = (layer.out_features, layer.in_features)
    if tuple(current.shape) != shape:  # before dequantizing: a wrong shape allocates nothing
        raise StorageError(
            f"{root / MANIFEST_FILE}: {alias} has shape {tuple(current.shape)}, the packed "
            f"weight it is tied to {shape}"
        )
    W = layer.dequantize()
    device = layer.level_classes.device if current.device.type == "meta" else current.device
    W = W.to(device=device, dtype=dtype or current.dtype)
    setattr(module, attr, nn.Parameter(W, requires_grad=current.requires_grad))
    layer.aliases.append(alias)


def _tie(model: nn.Module, alias: str, stored: str, root: Path) -> None:
    """Point ``alias`` (e.g. ``lm_head.weight``) at the very tensor stored as ``stored``."""
    try:
        owner, _, attr = alias.rpartition(".")
        source_owner, _, source_attr = stored.rpartition(".")
        tensor = getattr(model.get_submodule(source_owner), source_attr)
        setattr(model.get_submodule(owner), attr, tensor)
    except (AttributeError, TypeError, KeyError) as err:
        raise StorageError(f"{root / MANIFEST_FILE}: cannot tie {alias} to {stored}") from err


GENERATION_FILE = "generation_config.json"
# files of a folder that are not the tokenizer's (what the manifest lists besides it)
NOT_TOKENIZER = {CONFIG_FILE, DENSE_FILE, QUANTIZED_FILE, GENERATION_FILE, CARD_FILE}


def _load_generation_config(model: nn.Module, root: Path, listed: set[str]) -> None:
    """The generation config, if the manifest lists it (an unlisted file is ignored)."""
    if GENERATION_FILE not in listed:
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(root)
    except Exception as err:
        raise StorageError(f"{root / GENERATION_FILE}: {one_line(err)}") from err


def _load_tokenizer(root: Path, listed: set[str]) -> Any:
    """The tokenizer from the files the manifest lists, and only those.

    transformers reads whatever tokenizer files a folder holds; the listed ones (checked by the
    manifest) are copied into a temp folder with ``config.json`` and loaded from there, so an
    unlisted ``tokenizer.json`` or ``tokenizer_config.json`` is ignored, as the log says.
    """
    import shutil
    import tempfile

    names = sorted(
        rel
        for rel in listed
        if rel not in NOT_TOKENIZER and not is_weight_name(rel) and "/" not in rel
    )
    if not any(n in names for n in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="baq-tokenizer-") as tmp:
        for rel in [*names, CONFIG_FILE]:
            shutil.copyfile(root / rel, Path(tmp) / rel, follow_symlinks=False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        except Exception as err:
            raise StorageError(f"{root}: cannot load the tokenizer ({one_line(err)})") from err
    tokenizer.name_or_path = str(root)  # where it came from, not the temp copy
    return tokenizer

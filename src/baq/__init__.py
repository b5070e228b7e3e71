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

from baq.integrations import transformers_register

from .config import QuantConfig

__version__ = "0.1.0"

# AutoModelForCausalLM.from_pretrained(baq folder) after `import baq`; transformers itself is
# not imported here (hf_register waits for it); after __version__, which registering reads
transformers_register.install()

if TYPE_CHECKING:
    from baq.run.session import SessionResult

__all__ = [
    "QuantConfig",
    "__version__",
    "load",
    "load_model",
    "perplexity",
    "quantize",
    "save",
    "set_cache",
    "tune",
]


def load_model(*args: Any, **kwargs: Any):
    """See :func:`baq.model.loader.load_model`."""
    from baq.model.loader import load_model as _load

    return _load(*args, **kwargs)


def save(*args: Any, **kwargs: Any):
    """See :func:`baq.saved.storage.save_quantized`: ``save(dir, model, tokenizer, run.results,
    cfg)``."""
    from baq.saved.storage import save_quantized

    return save_quantized(*args, **kwargs)


def load(*args: Any, **kwargs: Any):
    """See :func:`baq.saved.storage.load_quantized`: ``model, tokenizer = load(dir,
    device=...)``."""
    from baq.saved.storage import load_quantized

    return load_quantized(*args, **kwargs)


def set_cache(model: Any, cache: str) -> int:
    """See :func:`baq.saved.packed_linear.set_cache`: ``baq.set_cache(model, "weight")`` after
    ``from_pretrained`` (which builds the default ``"kernel"``) trades memory for speed."""
    from baq.saved.packed_linear import set_cache as _set

    return _set(model, cache)


def tune(*args: Any, **kwargs: Any):
    """See :func:`baq.run.tune_setup.tune`: ``baq.tune("smollm2-baq3", "smollm2-baq3-tuned")``
    distils a saved folder into its float model (ranges trained, codes kept) and saves it."""
    from baq.run.tune_setup import tune as _tune

    return _tune(*args, **kwargs)


def perplexity(*args: Any, **kwargs: Any) -> float:
    """See :func:`baq.eval.scoring.perplexity`."""
    from baq.eval.scoring import perplexity as _ppl

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
    evaluation: Any = None,
    eval_seqlen: int = 2048,
    eval_windows: int | None = 16,
    output: Any = None,
    measurement: Any = None,
    report: Any = None,
    progress: bool | None = None,
    max_shard_size: int | str = "5GB",
) -> SessionResult:
    """Quantize ``model`` in place: the same run as ``baq quantize`` (:mod:`baq.run.session`).

    With the default config that is BAQ at 3 bits with one budget for the whole model, clipped
    and rotated (:class:`QuantConfig`): a measurement pass prices every layer, the closed form
    allocates every column, then the sequential pass quantizes. A config asking for
    ``allocation="model"`` always gets its measurement and plan.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer (used when ``calibration`` or ``evaluation`` is text, and saved
            with ``output``).
        config: the settings (default: :class:`QuantConfig`'s, the command line's).
        calibration: a source name (``builtin``, ``wikitext2``, ...), a .txt/.jsonl path, or a
            (nsamples, seqlen) int64 tensor of token windows.
        nsamples, seqlen, seed: calibration windows drawn from text sources (from token 0).
        device: where blocks are solved (default: CUDA when present).
        evaluation: text sources to score before and after (perplexity, and the KL divergence
            against the float model), or None.
        eval_seqlen, eval_windows: the evaluation windows.
        output: save the packed model in this folder (a new or previous baq folder).
        measurement: a :class:`baq.run.measure.Measurement` (or its file) to plan with.
        report: write the JSON report here.
        progress: progress bars (None: on a terminal, log lines otherwise).
        max_shard_size: weight files of ``output`` larger than this are split into shards, as
            transformers' ``max_shard_size`` (``"5GB"``, ``"500MB"``, ``"2GiB"`` or bytes).
    Returns:
        The :class:`baq.run.session.SessionResult`: ``.results`` (what :func:`save` packs),
        ``.records`` and ``.report`` (the report ``baq quantize --report`` writes).
    """
    from pathlib import Path

    import torch

    from baq.run.measure import Measurement
    from baq.run.session import Session, run_session
    from baq.saved.shards import parse_shard_size

    parse_shard_size(max_shard_size)  # a bad size fails here, before any block is solved

    from . import data

    sources = [evaluation] if isinstance(evaluation, str) else list(evaluation or [])
    sets = {}
    for src in sources:
        tokens = data.tokenize(tokenizer, data.load_text(src, split="test"))
        sets[src] = data.eval_windows(tokens, eval_seqlen, eval_windows)
    if isinstance(calibration, torch.Tensor):
        calib, calib_cfg = calibration, None
    else:
        # as on the command line: never calibrate on evaluated tokens
        start = data.calibration_start(str(calibration), sources, eval_windows, eval_seqlen) or 0
        calib_cfg = data.CalibConfig(str(calibration), nsamples, seqlen, seed, start)
        tokens = data.tokenize(tokenizer, data.load_text(calib_cfg.source, split="train"))
        calib = data.calibration_windows(tokens, nsamples, seqlen, seed, start)
    if isinstance(measurement, (str, Path)):
        measurement = Measurement.load(measurement)
    session = Session(
        cfg=config or QuantConfig(),
        device=device or "auto",
        output=None if output is None else Path(output),
        measurement=measurement,
        report_path=None if report is None else Path(report),
        model_name=str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model"),
        progress=progress,
        max_shard_size=max_shard_size,
    )
    return run_session(model, tokenizer, calib, session, sets, calib_cfg)

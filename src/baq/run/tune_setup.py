"""What ``baq tune`` needs before it trains: the saved folder, its float model, the memory plan,
and :func:`tune`, the Python entry (``baq.tune``) that composes them with :mod:`baq.run.tune`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from baq.config import DEFAULT_TUNE_SEQLEN, base_record_bytes
from baq.run.memory_estimate import MemoryEstimate, model_shape, resident_bytes
from baq.run.tune import TuneConfig, TuneResult, teacher_records, tune_model
from baq.saved.packed_linear import PackedLinear

log = logging.getLogger(__name__)

# bytes a quantized weight costs while tuning: its unpacked code (1), and each step its float32
# weight and ``code - zero`` kept for the backward (4 + 4)
TUNE_BYTES_PER_WEIGHT = 9


def source_config(folder: str | os.PathLike) -> dict:
    """The ``quantization_config`` block of a saved folder (checked as a load checks it)."""
    from baq.saved.manifest import CONFIG_FILE, StorageError, read_json

    qc = read_json(Path(folder) / CONFIG_FILE, "the model config").get("quantization_config")
    if not isinstance(qc, dict):
        raise StorageError(f"{folder}: no quantization_config: not a baq model folder")
    return qc


def base_of(qconfig: dict) -> tuple[str | None, bool]:
    """The float model a saved folder was made from, as the loader takes it.

    Returns:
        ``(model argument, found)``: the hub id the folder names (the reference model's hub id
        means the built-in reference, whose package is what baq quantizes it from: ``None``);
        ``found`` False when the folder names none (a local model was quantized).
    """
    from baq.model.loader import REFERENCE_PACKAGE
    from baq.saved.model_card import REFERENCE_HUB_ID, hub_id_or_none

    base = hub_id_or_none(qconfig.get("base_model"))
    if base is None:
        return None, False
    if base == REFERENCE_HUB_ID:
        import importlib.util

        if importlib.util.find_spec(REFERENCE_PACKAGE) is not None:
            return None, True
    return base, True


class SourceTokenizer:
    """What a tuned folder saves as its tokenizer: the source folder's tokenizer files, copied
    byte for byte (a loaded tokenizer's ``save_pretrained`` adds keys of its own)."""

    def __init__(self, folder: Path, files: list[str]) -> None:
        self.folder, self.files = folder, files

    def save_pretrained(self, target: str | os.PathLike) -> None:
        import shutil

        for rel in self.files:
            shutil.copyfile(self.folder / rel, Path(target) / rel, follow_symlinks=False)


def open_source(folder: str | os.PathLike) -> tuple[nn.Module, Any, dict, str, SourceTokenizer]:
    """``(model, tokenizer, quantization_config, manifest digest, tokenizer files)`` of a saved
    folder."""
    from baq.saved.loading import NOT_TOKENIZER, load_quantized
    from baq.saved.manifest import MANIFEST_FILE, sha256_of, verify_manifest

    folder = Path(folder)
    model, tok = load_quantized(folder, cache="none")
    listed = verify_manifest(folder)["files"]
    weights = (".safetensors", ".safetensors.index.json")  # sharded weights too
    files = sorted(
        r for r in listed if r not in NOT_TOKENIZER and "/" not in r and not r.endswith(weights)
    )
    digest = sha256_of(folder / MANIFEST_FILE)
    return model, tok, source_config(folder), digest, SourceTokenizer(folder, files)


def teacher_mismatch(student: nn.Module, teacher: nn.Module) -> str | None:
    """The first unquantized tensor (embeddings, biases) in which the teacher differs from the
    saved model, or None: a save keeps its float model's unquantized tensors, so a difference
    means another model. Norms are left out (an earlier ``--tune-norms`` changed them)."""
    theirs = teacher.state_dict()
    packed = {n for n, m in student.named_modules() if isinstance(m, PackedLinear)}
    for key, t in student.state_dict().items():
        if key.rpartition(".")[0] in packed or "norm" in key.lower() or key not in theirs:
            continue
        other = theirs[key]
        if other.shape != t.shape or not torch.equal(other.to(t.dtype).cpu(), t.cpu()):
            return key
    return None


def windows_read(calib: Tensor, cfg: TuneConfig) -> Tensor:
    """The calibration windows a run reads: the first ``steps * batch`` (all when there are
    fewer). The teacher's forward over a window costs about half a training step (which adds
    the backward), so at the default 100 steps the 28 of 128 windows no step reads would add
    about 8 % to the stage. The steps make one pass over the windows kept, in the seeded order
    of :func:`baq.run.tune.batch_windows`; the check windows are the first of them."""
    used = cfg.steps * cfg.batch
    if len(calib) > used:
        log.info("the teacher records %d of %d calibration windows: %d step(s) of %d read no more",
                 used, len(calib), cfg.steps, cfg.batch)  # fmt: skip
        return calib[:used]
    return calib


def estimate_memory(
    teacher_config: Any,
    folder: Path,
    cfg: TuneConfig,
    *,
    nsamples: int,
    seqlen: int,
    eval_seqlen: int | None,
    eval_windows: int | None,
    dtype: str = "float32",
    file_bytes: int = 0,
    gguf: bool = False,
    resident: int | None = None,
) -> MemoryEstimate:
    """What ``baq tune`` holds (bytes), from the teacher's config and the folder's header.

    Terms: the teacher's weights and the packed model (both, though the teacher goes before
    training: an upper bound); the teacher's records of the calibration and evaluation windows
    (top ``k`` per position); the training (``tune``): :data:`TUNE_BYTES_PER_WEIGHT` per
    quantized weight, one window's activations kept for the backward (per block about 12
    hidden-wide and 6 MLP-wide float32 values per token and three heads x seq x seq attention
    maps), its logits with their log-softmax and gradients, and per trainable parameter its
    value, gradient and Adam's two moments.
    """
    from baq.saved.loading import packed_layers_meta
    from baq.saved.manifest import WEIGHT_FILES, listed_files, weight_files
    from baq.saved.packing import range_groups

    shape = model_shape(teacher_config)
    item = {"float16": 2, "bfloat16": 2}.get(dtype, 4)
    hidden, vocab = int(teacher_config.hidden_size), int(teacher_config.vocab_size)
    inter = int(getattr(teacher_config, "intermediate_size", None) or 4 * hidden)
    heads = int(getattr(teacher_config, "num_attention_heads", 1) or 1)
    listed = listed_files(folder)  # a weight file may be sharded (docs/FORMAT.md, section 1)
    files = [f for w in WEIGHT_FILES for f in weight_files(folder, w, listed)]
    packed_bytes = sum((folder / f).stat().st_size for f in files)
    weights = groups = 0
    for m in packed_layers_meta(folder).values():
        rows, cols = m["shape"]
        weights += rows * cols
        ngroups = range_groups((rows, cols), m["group_size"], m["dim"])
        groups += rows * ngroups if m["dim"] == "oc" else ngroups * cols
    trainable = groups + (2 * shape["blocks"] + 1) * hidden * int(cfg.tune_norms)
    per_block = seqlen * (12 * hidden + 6 * inter) * 4 + 3 * heads * seqlen * seqlen * 4
    tune = (
        TUNE_BYTES_PER_WEIGHT * weights + shape["blocks"] * per_block
        + 4 * seqlen * vocab * 4 + 16 * trainable
    )  # fmt: skip
    read = min(nsamples, cfg.steps * cfg.batch)  # the windows the steps read (windows_read)
    records = base_record_bytes(read * (seqlen - 1), min(cfg.topk, vocab))
    evaluation = 0
    if eval_seqlen is not None:
        records += base_record_bytes((eval_windows or 1) * (eval_seqlen - 1), min(cfg.topk, vocab))
        evaluation = 3 * eval_seqlen * vocab * 4 + eval_seqlen * (8 * hidden + 4 * inter) * item
    return MemoryEstimate(
        resident=resident_bytes() if resident is None else resident,
        weights=shape["params"] * item + packed_bytes,
        load=file_bytes + (2 * shape["largest"] * item if gguf else 0),
        activations=0,
        hessians=0,
        solve=0,
        forward=0,
        evaluation=evaluation,
        calib_tokens=nsamples * seqlen * 8,
        base_record=records,
        tune=tune,
    )


def tune(
    saved: str | os.PathLike | nn.Module,
    output: str | os.PathLike | None = None,
    base: str | nn.Module | None = None,
    config: TuneConfig | None = None,
    calibration: Any = "builtin",
    nsamples: int = 128,
    seqlen: int = DEFAULT_TUNE_SEQLEN,
    seed: int = 0,
    evaluation: Any = None,
    eval_seqlen: int = 2048,
    eval_windows: int | None = 16,
    device: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    base_gguf_file: str | None = None,
    dtype: str = "auto",
) -> TuneResult:
    """Distil a saved quantized model into its float model (:mod:`baq.run.tune`).

    Args:
        saved: a saved folder, or a model loaded from one (``baq.load``: tuned in place; it
            cannot be saved, having lost its folder's ``quantization_config``).
        output: write the tuned folder here (only with a folder as ``saved``).
        base: the float model (hub id, folder, .gguf, ``"reference"`` or a model); default the
            one the folder names, which must then hold the folder's unquantized tensors.
        config: the settings (:class:`~baq.run.tune.TuneConfig`).
        calibration: a text source or a (n, seqlen) int64 tensor of windows; nsamples, seqlen,
            seed: the windows drawn from a text (after the evaluated tokens when both read it).
        evaluation: text sources scored before and after (perplexity, KL against ``base``), or
            a dict of name -> (n, seq) windows.
        base_gguf_file, dtype: how ``base`` loads (:func:`baq.model.loader.load_model`).
    Returns:
        The :class:`~baq.run.tune.TuneResult`.
    """
    from baq import data
    from baq.model import loader

    t0 = time.perf_counter()
    cfg = config or TuneConfig()
    if isinstance(saved, nn.Module):
        if output is not None:
            raise ValueError("output: pass the saved folder (a path), not a loaded model")
        model, tok, qconfig, digest, name = saved, None, None, "", "the model"
        files = None
    else:
        model, tok, qconfig, digest, files = open_source(saved)
        name = str(saved)
    named = base is None
    if named:
        base, found = base_of(qconfig or {})
        if not found:
            raise ValueError(f"{name} names no base model: pass the float model as base=")
    elif base == "reference":
        base = None  # the built-in reference model
    if isinstance(base, nn.Module):
        teacher, base_name = base, "base"
    else:
        teacher, teacher_tok = loader.load_model(base, base_gguf_file, dtype, device="cpu")
        tok = tok or teacher_tok
        base_name = base or "the reference model"
    why = teacher_mismatch(model, teacher)
    if why is not None:
        line = f"{base_name} is not the float model of {name} (their {why} differ)"
        if named:
            raise ValueError(f"{line}: pass the model it was quantized from as base (--base)")
        log.warning("%s: distilling into it all the same", line)
    if isinstance(evaluation, dict):
        sets, sources = dict(evaluation), list(evaluation)
    else:
        sources = [evaluation] if isinstance(evaluation, str) else list(evaluation or [])
        sets = {}
        for src in sources:
            tokens = data.tokenize(tok, data.load_text(src, split="test"))
            sets[src] = data.eval_windows(tokens, eval_seqlen, eval_windows)
    if isinstance(calibration, torch.Tensor):
        calib = calibration
    else:
        start = data.calibration_start(str(calibration), sources, eval_windows, eval_seqlen) or 0
        tokens = data.tokenize(tok, data.load_text(str(calibration), split="train"))
        calib = data.calibration_windows(tokens, nsamples, seqlen, seed, start)
    calib = windows_read(calib, cfg)
    dev = loader.resolve_device(device or "auto")
    t = time.perf_counter()
    records = teacher_records(teacher, calib, sets, cfg.topk, dev, str(base_name))
    seconds = {"load": t - t0, "teacher": time.perf_counter() - t}
    del teacher  # the records are all training needs of it
    return tune_model(
        model, calib, records, cfg, device=dev, eval_sets=sets, source=digest,
        output=None if output is None else Path(output), tokenizer=files, qconfig=qconfig,
        resume=resume, force=force, progress=progress, seconds=seconds,
    )  # fmt: skip

"""Memory planned before a run: what a quantization will hold, where the activations go, and
one-line errors for the allocation failures that still happen.

:func:`estimate` reads only a model config (``config.json`` or a GGUF header, built on the meta
device to count parameters) and the run's settings, and adds up what the pipeline holds at its
peaks (DESIGN.md section 3: the sequential protocol keeps one block's state at a time):

* calibration activations, the inputs and outputs of a block: ``2 x nsamples x seqlen x hidden x
  itemsize`` (two :class:`~baq.run.activations.ActivationStore` live during a block's forward);
* the block's Hessians: ``H = 2 X X^T / n`` per linear (``in_features^2`` in float32 or 64); the
  accumulator becomes the matrix handed to the solver (``run.hessian``), and linears that read
  one input share it, so this is an upper bound (q/k/v and gate/up counted apart);
* the weights: the whole model, or with ``--lazy`` the tensors outside the blocks plus one block;
  and the solver's copies of the costliest linear (:func:`solve_bytes`: one working copy of
  ``H`` factorised in place, ``U``, weight, codes and the solver's buffers);
* one batched block forward (hidden states, MLP, attention scores ``heads x seqlen^2``);
* evaluation: one window's logits ``eval_seqlen x vocab x 4`` bytes plus its log-softmax, and
  the compact base record kept across windows (top-k log-probabilities per position).

:func:`plan` compares that with :func:`available_memory` (``psutil``'s available memory, capped
by ``ulimit -v`` and a cgroup limit) and decides: activations in RAM; activations spilled to a
temporary file (byte-identical results, as ``--max-activation-memory`` guarantees); or a refusal
before the model loads, naming the numbers and the flags that fix it.
"""

from __future__ import annotations

import errno
import logging
import re
import resource
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from baq.config import BATCH_TOKENS, base_record_bytes
from baq.run.activations import format_size
from baq.run.solve_memory import solve_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

GIB = 2**30
# headroom for what the sum leaves out: allocator slack, thread stacks, tokenizer, page cache of
# mapped files; max(512 MiB, 10 % of the available memory)
MARGIN_BYTES = 512 * 2**20
MARGIN_FRACTION = 0.10
DISK_MARGIN_BYTES = 2 * GIB  # left free on the spill disk (checkpoint, other users)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class MemoryPlanError(ValueError):
    """The run cannot fit, even with spilled activations: one line, exit code 2."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run holds, by kind (each at its largest moment), and the peaks they add up to.

    Attributes:
        resident: this process's resident memory when the estimate was made (interpreter, torch,
            transformers): everything else comes on top of it.
        weights: model weights held in memory (whole model; ``--lazy``: outside the blocks plus
            one block).
        load: extra memory while loading: the weight files' mapped pages, and for GGUF two
            more copies of the largest tensor (dequantized, then converted).
        activations: calibration inputs and outputs of a block, 0 for RTN.
        hessians: one block's Hessians, one matrix per linear.
        solve: the solver's copies for the widest linear of a block.
        forward: one batched block forward during calibration.
        evaluation: one evaluation window's logits and forward.
        base_record: the compact base record of every evaluation window (the float model's top
            tokens per position, :func:`baq.config.base_record_bytes`), held from the first
            evaluation to the last.
        calib_tokens: the (nsamples, seqlen) int64 calibration windows.
        results: the solver results kept for the save: float32 weight and int32 codes per
            quantized weight (8 bytes), or with ``--lazy`` compact uint8 codes (1 byte); a lazy
            run that saves keeps them in its checkpoint's files (memory-mapped file pages,
            which the kernel drops under pressure), so only the block being solved counts.
        save: the packed layers built for the save, one shard at a time: at most a byte per
            quantized weight (codes of up to 8 bits) of one shard and its largest layer, with
            the results still held.
        importance: the model-level allocation's Fisher pass (``baq.run.importance``): every
            block's inputs for its windows, their gradients, the head's logits and one block's
            backward; its sensitivity pass holds at most what quantizing does.
        tune: ``baq tune``'s training (:func:`baq.run.tune_setup.estimate_memory`): the
            unpacked codes, each step's float weights, one window's activations with their
            gradients, the trainable parameters with Adam's state.
    """

    resident: int
    weights: int
    load: int
    activations: int
    hessians: int
    solve: int
    forward: int
    evaluation: int
    calib_tokens: int
    results: int = 0
    save: int = 0
    importance: int = 0
    base_record: int = 0
    tune: int = 0

    def quantize_peak(self, spilled: bool = False) -> int:
        held = 0 if spilled else self.activations
        return (
            self.resident + self.weights + held + self.hessians + self.solve + self.forward
            + self.calib_tokens + self.results
        )  # fmt: skip

    def peak(self, spilled: bool = False) -> int:
        """Largest resident size of the process: load, quantization, evaluation or save."""
        kept = self.resident + self.weights + self.results + self.base_record
        return max(
            self.resident + self.weights + self.load,
            self.quantize_peak(spilled),
            kept + self.evaluation + self.calib_tokens,
            kept + self.save,
            self.resident + self.weights + self.importance + self.calib_tokens,
            kept + self.tune + self.calib_tokens,
        )


@dataclass(frozen=True)
class MemoryPlan:
    """The decision made from an estimate.

    Attributes:
        estimate: the :class:`MemoryEstimate`.
        available: memory available to this process when planned (bytes).
        spill_dir: the folder spilled activations go to (``$TMPDIR``).
        disk_free: free bytes there.
        spill: the activations go to disk (``max_activation_bytes`` is then 0 unless the user
            gave a budget).
        auto_spill: the plan chose to spill (no ``--max-activation-memory`` was given).
        max_activation_bytes: the RAM budget per activation store the pipeline gets.
    """

    estimate: MemoryEstimate
    available: int
    spill_dir: str
    disk_free: int
    spill: bool
    auto_spill: bool
    max_activation_bytes: int | None

    @property
    def peak(self) -> int:
        return self.estimate.peak(self.spill)

    def as_dict(self) -> dict[str, Any]:
        """JSON fields for the run report (bytes, plus the estimated peak in GiB)."""
        return {
            **{f"{k}_bytes": v for k, v in asdict(self.estimate).items()},
            "available_bytes": self.available,
            "spill_dir": self.spill_dir,
            "disk_free_bytes": self.disk_free,
            "spill": self.spill,
            "auto_spill": self.auto_spill,
            "estimated_peak_gib": self.peak / GIB,
        }

    def describe(self) -> str:
        e = self.estimate
        parts = [
            f"now {format_size(e.resident)}",
            f"weights {format_size(e.weights)}",
            f"activations {format_size(e.activations)}"
            + (f" (on disk in {self.spill_dir})" if self.spill else ""),
            f"Hessians {format_size(e.hessians)}",
            f"solver {format_size(e.solve)}",
            f"results {format_size(e.results)}",
            f"block forward {format_size(e.forward)}",
            f"evaluation {format_size(e.evaluation)}",
            *([f"importance pass {format_size(e.importance)}"] if e.importance else []),
            *([f"tuning {format_size(e.tune)}"] if e.tune else []),
            f"load {format_size(e.load)}",
        ]
        return (
            f"memory estimate: peak {format_size(self.peak)} of {format_size(self.available)} "
            f"available ({', '.join(parts)})"
        )


def _itemsize(dtype: Any) -> int:
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return _DTYPE_BYTES.get(name, 4)


def model_dtype(config: Any, requested: str = "auto", gguf: bool = False) -> str:
    """The dtype the model will load in: ``--dtype``, else the config's (GGUF: float32)."""
    if requested != "auto":
        return requested
    if gguf:
        return "float32"  # transformers dequantizes GGUF tensors to float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return name if name in _DTYPE_BYTES else "float32"


def model_shape(config: Any) -> dict[str, Any]:
    """Parameter counts and linear shapes of a model, from its config alone (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from baq.model import blocks

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    layers = blocks.decoder_layers(skeleton)
    first = layers[0]
    # tied tensors count once, as in memory
    total = sum(p.numel() for p in skeleton.parameters())
    block = sum(p.numel() for p in first.parameters())
    shapes = [tuple(blocks.get_weight(m).shape) for m in blocks.linears(first).values()]
    largest = max(p.numel() for p in skeleton.parameters())
    head = skeleton.get_output_embeddings()
    return {
        "params": total,
        "block_params": block,
        "blocks": len(layers),
        "linears": shapes,
        "largest": largest,
        "head": None if head is None else tuple(blocks.get_weight(head).shape),
    }


def estimate(
    config: Any,
    *,
    method: str,
    nsamples: int,
    seqlen: int,
    eval_seqlen: int | None,
    eval_windows: int | None,
    dtype: str = "float32",
    hessian_dtype: str = "float32",
    lazy: bool = False,
    file_bytes: int = 0,
    gguf: bool = False,
    saving: bool = False,
    resident: int | None = None,
    shape: dict[str, Any] | None = None,
    include_head: bool = False,
    importance_windows: int = 0,
    rotate: bool = False,
    planned: bool = False,
    shard_bytes: int = 5 * 10**9,
) -> MemoryEstimate:
    """What a run of ``baq quantize`` will hold, in bytes, before any weight is read.

    Args:
        config: the model's transformers config.
        method: rtn (no activations, no Hessians), gptq or baq.
        nsamples, seqlen: the calibration windows.
        eval_seqlen, eval_windows: evaluation windows (None: no evaluation).
        dtype: the dtype the model loads in (:func:`model_dtype`).
        hessian_dtype: float32 or float64.
        lazy: blocks are read one at a time.
        file_bytes: size of the weight files on disk (mapped while loading).
        gguf: the weights come from a GGUF file: each tensor is dequantized into a NumPy array
            and then copied into the model, so the largest tensor exists twice more while
            loading (the reference model: 787 MiB measured over 513 MiB of weights, a 94 MiB
            file and two 108 MiB copies of its embedding).
        saving: the run saves the packed model (``--output``).
        resident: resident memory now (default: measured with psutil).
        shape: :func:`model_shape` of the config (computed when not given).
        include_head: the output head is quantized too, after the last block: its Hessian
            (counted on top of a block's, an upper bound), its solve (the largest of a block's
            and the head's: a vocabulary-wide head costs more than any block linear) and its
            result.
        importance_windows: calibration windows of the model-level allocation's Fisher pass
            (0: no model-level allocation).
        rotate: the layers are quantized in a rotated basis (:func:`solve_bytes`).
        planned: BAQ's levels come from the model-level plan (one solve per layer).
        shard_bytes: the save's ``--max-shard-size`` (the save packs a shard at a time).
    """
    shape = shape or model_shape(config)
    item = _itemsize(dtype)
    hbytes = _itemsize(hessian_dtype)
    hidden = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    vocab = int(config.vocab_size)
    weights = shape["params"] * item
    if lazy:
        weights -= (shape["blocks"] - 1) * shape["block_params"] * item
    calibrated = method != "rtn"
    activations = 2 * nsamples * seqlen * hidden * item if calibrated else 0
    hessians = sum(cols * cols for _, cols in shape["linears"]) * hbytes if calibrated else 0
    linears = list(shape["linears"])
    head = shape.get("head") if include_head else None
    if head is not None:
        linears.append(head)
        hessians += head[1] ** 2 * hbytes if calibrated else 0
    # BAQ with the model-level plan solves each layer once at its planned levels, as GPTQ does;
    # only the per-layer allocation adds its uniform measuring solve
    solver = "gptq" if method == "baq" and planned else method
    solve = max(solve_bytes(rows, cols, hbytes, solver, rotate) for rows, cols in linears)
    batch = max(1, min(nsamples, BATCH_TOKENS // seqlen))
    forward = _forward_bytes(batch, seqlen, hidden, inter, heads, item) if calibrated else 0
    if calibrated:  # a hooked input is cast to the Hessian dtype before X^T X
        forward += batch * seqlen * max(c for _, c in shape["linears"]) * hbytes
    evaluation = base_record = 0
    if eval_seqlen is not None:
        copies = 2 if item == 4 else 3  # logits (+ their float32 copy), log-softmax
        evaluation = copies * eval_seqlen * vocab * 4
        evaluation += _forward_bytes(1, eval_seqlen, hidden, inter, heads, item)
        base_record = base_record_bytes((eval_windows or 1) * (eval_seqlen - 1))
    quantized = shape["blocks"] * sum(rows * cols for rows, cols in shape["linears"])
    quantized += head[0] * head[1] if head is not None else 0
    largest = max(rows * cols for rows, cols in linears)
    block_quantized = max(sum(rows * cols for rows, cols in shape["linears"]), largest)
    importance = 0
    if importance_windows:
        w = min(importance_windows, nsamples)
        # block inputs of every block and the last one's outputs, and their gradients
        importance = (shape["blocks"] + 2) * w * seqlen * hidden * item
        importance += 3 * seqlen * vocab * 4  # the head's float logits, probabilities, gradient
        # one block's backward: its forward's temporaries kept for autograd, and their gradients
        importance += 2 * _forward_bytes(1, seqlen, hidden, inter, heads, 4)
    if resident is None:
        resident = resident_bytes()
    return MemoryEstimate(
        resident=resident,
        weights=weights,
        load=file_bytes + (2 * shape["largest"] * item if gguf else 0),
        activations=activations,
        hessians=hessians,
        solve=solve,
        forward=forward,
        evaluation=evaluation,
        calib_tokens=nsamples * seqlen * 8 if calibrated else 0,
        results=(block_quantized if saving else quantized) if lazy else quantized * 8,
        save=min(quantized, shard_bytes + largest) if saving else 0,
        importance=importance,
        base_record=base_record,
    )


def _forward_bytes(batch: int, seq: int, hidden: int, inter: int, heads: int, item: int) -> int:
    """Temporaries of one block forward over (batch, seq): about eight hidden-wide states
    (norms, q/k/v, attention output, residuals), four MLP-wide ones (gate, up, activation,
    product) and two (heads, seq, seq) attention score tensors (scores and their softmax)."""
    tokens = batch * seq
    return tokens * (8 * hidden + 4 * inter) * item + 2 * batch * heads * seq * seq * item


def resident_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def available_memory() -> int:
    """Bytes this process may still allocate: ``psutil``'s available memory, capped by the
    address-space limit (``ulimit -v``, less what is mapped now) and a cgroup v2 limit."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        avail = min(avail, max(0, soft - int(psutil.Process().memory_info().vms)))
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def spill_folder() -> str:
    """Where spilled activations go: the system temp dir (``$TMPDIR``, else /tmp)."""
    return tempfile.gettempdir()


def disk_free(folder: str) -> int:
    return int(shutil.disk_usage(folder).free)


def admit(
    est: MemoryEstimate,
    *,
    nsamples: int,
    seqlen: int,
    max_activation_bytes: int | None,
    lazy: bool,
    lazy_possible: bool,
    evaluating: bool,
    available: int | None = None,
    spill_dir: str | None = None,
    free: int | None = None,
) -> MemoryPlan:
    """Decide where the activations go, or refuse with one line naming the numbers and fixes.

    Activations stay in RAM when the whole peak fits in the available memory less a margin
    (``max(512 MiB, 10 %)``); otherwise they spill to ``spill_dir`` when its disk holds them
    with :data:`DISK_MARGIN_BYTES` to spare. A budget given by the user
    (``max_activation_bytes``) is kept as it is, only checked against the disk.

    Raises:
        MemoryPlanError: the rest of the run does not fit (the weights without ``--lazy``, an
            evaluation window), or the activations fit neither in memory nor on the disk.
    """
    available = available_memory() if available is None else available
    spill_dir = spill_folder() if spill_dir is None else spill_dir
    free = disk_free(spill_dir) if free is None else free
    room = available - max(MARGIN_BYTES, int(MARGIN_FRACTION * available))
    # the estimate's resident part is already spent: it is not in `available`
    need_spilled = est.peak(spilled=True) - est.resident
    if need_spilled > room:
        raise MemoryPlanError(_too_big(est, need_spilled, room, lazy, lazy_possible, evaluating))
    user_budget = max_activation_bytes is not None
    if user_budget:
        spill = est.activations // 2 > max_activation_bytes
    else:
        spill = est.peak(spilled=False) - est.resident > room
    if spill and est.activations + DISK_MARGIN_BYTES > free:
        fit = max(0, (free - DISK_MARGIN_BYTES) * nsamples // max(est.activations, 1))
        raise MemoryPlanError(
            f"calibration activations need {format_size(est.activations)} "
            f"(2 x {nsamples} samples x {seqlen} tokens): more than the "
            f"{format_size(max(room, 0))} of memory available and the {format_size(free)} "
            f"free in {spill_dir} (where they spill, keeping {format_size(DISK_MARGIN_BYTES)}); "
            f"lower --nsamples (at most {fit} fit on that disk) or --seqlen, or set TMPDIR to "
            "a folder on a larger disk"
        )
    budget = max_activation_bytes if user_budget else (0 if spill else None)
    return MemoryPlan(est, available, spill_dir, free, spill, spill and not user_budget, budget)


def _too_big(
    est: MemoryEstimate, need: int, room: int, lazy: bool, lazy_possible: bool, evaluating: bool
) -> str:
    fixes = []
    if not lazy:
        fixes.append(
            "add --lazy (one block in memory at a time)"
            if lazy_possible
            else "save the model as a safetensors folder and add --lazy (one block at a time)"
        )
    fixes.append("--dtype bfloat16 (half the weights' memory)")
    if evaluating and est.evaluation > est.weights // 4:
        fixes.append("a smaller --eval-seqlen (each window holds seqlen x vocab logits)")
    return (
        f"the run needs about {format_size(need)} of memory even with its calibration "
        f"activations on disk (weights {format_size(est.weights)}, loading "
        f"{format_size(est.load)}, evaluation {format_size(est.evaluation)}) but only "
        f"{format_size(max(room, 0))} is available after a safety margin; " + ", or ".join(fixes)
    )


# ----- allocation failures that still happen


_ALLOCATE = re.compile(r"allocate (\d+) bytes")


def out_of_memory(err: BaseException) -> bool:
    """An allocator failure: torch's CPU allocator, CUDA's, Python's, or ``ENOMEM``."""
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, OSError):
        return err.errno == errno.ENOMEM
    if not isinstance(err, RuntimeError):
        return False
    if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA, MPS)
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def memory_error_line(err: BaseException, checkpoint: Path | None) -> str:
    """One line for an allocator failure: what failed, the flags that lower memory, the resume."""
    text = str(err)
    match = _ALLOCATE.search(text)
    if match:
        what = f"could not allocate {format_size(int(match.group(1)))}"
    elif "out of memory" in text.lower():
        head = text.splitlines()[0] if text.strip() else ""
        what = head.split(". ")[0].strip().rstrip(".") or "out of memory"
    else:
        what = "could not allocate memory"
    line = (
        f"out of memory ({what}); lower --nsamples or --seqlen, spill calibration activations "
        "with --max-activation-memory 0, add --lazy, or use a smaller --eval-seqlen"
    )
    if checkpoint is not None:
        line += f"; rerun with --resume to continue from the checkpoint in {checkpoint}"
    return line

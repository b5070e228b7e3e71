"""``baq tune``: distillation of a saved quantized model into its float model (issue 27, item 3).

The integer codes stay as they are; the continuous parameters (each range group's scale, see
:mod:`baq.run.tune_ranges`, and optionally the norm weights) are trained so that the quantized
model's next-token distribution matches the float model's on the calibration windows:

    min  E_windows  mean_t  KL(p_float(. | x_<t) || p_quant(. | x_<t))

as mlx-lm's distilled weight quantization (DWQ) and EfficientQAT's end-to-end stage do. The float
(teacher) side of each window is computed once and kept as the compact top-k record of
:mod:`baq.eval.divergence` (the ``k`` largest log-probabilities and the merged tail, the KL of its
module doc, exact when ``k`` covers the vocabulary), so the teacher is freed before training.

The stages, in order: the teacher's records of the calibration (and evaluation) windows; the
untuned model's scores; Adam on the trainable parameters for ``steps`` steps of ``batch``
windows (cosine learning rate), checkpointed every ``checkpoint_every`` steps into
``OUTPUT.partial`` so an interrupted run resumes to the same bytes; the ranges written back
(rounded to the layer's range dtype) and the rounding's effect measured; the tuned scores; the
save through :func:`baq.saved.storage.save_packed` (same codes, same sizes, a ``tuning`` block
in the ``quantization_config``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from baq.config import DEFAULT_TOPK, DEFAULT_TUNE_STEPS
from baq.eval.divergence import BaseRecord, compact_kl, windows_digest
from baq.eval.scoring import score_sets
from baq.run.checkpoint import hold, partial_dir, tensor_digest
from baq.run.tune_ranges import MIN_SCALE, tunable, tunable_layers, write_back
from baq.run.tune_state import STATE_FILE, TuneState, load_state, save_state
from baq.saved.packed_linear import PackedLinear

log = logging.getLogger(__name__)

TRAIN_DTYPES = ("auto", "float32", "bfloat16")
# CPU flags of bfloat16 matrix units (Linux /proc/cpuinfo): where "auto" trains in bfloat16
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
progress_log = logging.getLogger("baq.progress")


@dataclass(frozen=True)
class TuneConfig:
    """The distillation's settings.

    Attributes:
        steps: optimizer steps.
        lr: Adam's peak learning rate (cosine decay to 0); the range scales start at 1, so it is
            a relative change per step.
        batch: calibration windows per step (gradients accumulated window by window).
        tune_norms: train the RMSNorm/LayerNorm weights too.
        topk: top tokens per position kept of the teacher's distribution.
        checkpoint_every: steps between checkpoints (with an output folder).
        seed: seed of the window order.
        check_windows: calibration windows on which the KL is measured before training, after
            it and after rounding the ranges to their stored dtype.
        train_dtype: the training steps' matrix products: ``"float32"``, or ``"bfloat16"``
            under ``torch.autocast`` (parameters, Adam, the KL and the reported check-window
            KLs stay float32; on a CPU with bfloat16 matrix units a step takes about half the
            time: 1.64 against 3.56 CPU s for the reference model's 512 tokens, one thread), or
            ``"auto"`` (the default): bfloat16 on a CUDA device that supports it and on a CPU
            with bfloat16 units (:func:`resolve_train_dtype`), else float32. The same check
            KL either way on the reference model (0.1997 bfloat16, 0.1989 float32, session 15).
    """

    steps: int = DEFAULT_TUNE_STEPS
    lr: float = 1e-3
    batch: int = 1
    tune_norms: bool = False
    topk: int = DEFAULT_TOPK
    checkpoint_every: int = 25
    seed: int = 0
    check_windows: int = 4
    train_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.train_dtype not in TRAIN_DTYPES:
            raise ValueError(
                f"train_dtype={self.train_dtype!r}: use one of {', '.join(TRAIN_DTYPES)}"
            )
        for name in ("steps", "batch", "topk", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: use a positive integer")
        if self.check_windows < 0:
            raise ValueError(f"check_windows={self.check_windows}: use 0 or more")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: use a positive learning rate, e.g. 1e-3")


@dataclass
class TuneResult:
    """What a tuning run produced: the report (JSON-ready), the loss of every step and the
    tuned model (its packed layers hold the stored, rounded ranges)."""

    report: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    model: nn.Module | None = None


# ----------------------------------------------------------------------------- teacher


@dataclass
class TeacherRecords:
    """The float model's side of a tuning run, computed once: its compact records (top ``k``
    per position) of the calibration windows and of each evaluation set, and its perplexities."""

    calibration: BaseRecord
    sets: dict[str, BaseRecord]
    perplexity: dict[str, float]
    name: str


def teacher_records(
    teacher: nn.Module,
    calib: Tensor,
    sets: dict[str, Tensor],
    k: int,
    device: torch.device,
    name: str = "base",
) -> TeacherRecords:
    """Run the float model once over every window (then it may be freed)."""
    teacher.to(device)
    try:
        windows = {"calibration": calib, **sets}
        scored = score_sets(teacher, windows, device, "float", record_topk=k, base_name=name)
    finally:
        teacher.to("cpu")
    records = {n: s.base_record for n, s in scored.items()}
    calibration = records.pop("calibration")
    ppl = {n: s.perplexity for n, s in scored.items() if n in sets}
    return TeacherRecords(calibration, records, ppl, name)


# ----------------------------------------------------------------------------- training


def window_kl(model: nn.Module, window: Tensor, base, device: torch.device) -> Tensor:
    """Mean over the window's predicted positions of KL(teacher || model) (merged-tail KL)."""
    ids = window[None].to(device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    kl = compact_kl(base, logits, ids[0, 1:])[0]
    return kl.mean()


def mean_kl(model: nn.Module, calib: Tensor, record: BaseRecord, n: int, device) -> float | None:
    """Mean KL over the first ``n`` calibration windows (None for ``n == 0``)."""
    if n == 0:
        return None
    with torch.no_grad():
        return (
            sum(float(window_kl(model, calib[i], record.windows[i], device)) for i in range(n)) / n
        )


def cpu_has_bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU lists a bfloat16 matrix unit (:data:`BF16_CPU_FLAGS`); False where no
    /proc/cpuinfo exists (other systems train in float32 under "auto")."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_train_dtype(name: str, device: torch.device) -> str:
    """``"auto"`` made concrete for ``device`` (module docstring of :class:`TuneConfig`)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_bf16_units() else "float32"


def training_precision(cfg: TuneConfig, device: torch.device) -> Any:
    """The autocast context of a training step (a no-op at float32)."""
    name = resolve_train_dtype(cfg.train_dtype, device)
    enabled = name != "float32"
    dtype = getattr(torch, name) if enabled else None
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def batch_windows(step: int, n: int, cfg: TuneConfig) -> list[int]:
    """Window indices of ``step``: consecutive runs through seeded permutations of the ``n``
    windows (epoch ``e`` uses the seed ``cfg.seed + e``), a function of the step alone, so a
    resumed run reads the windows the uninterrupted one would."""
    out = []
    for pos in range(step * cfg.batch, (step + 1) * cfg.batch):
        epoch, i = divmod(pos, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        out.append(int(order[i]))
    return out


def learning_rate(step: int, cfg: TuneConfig) -> float:
    """Cosine decay from ``cfg.lr`` at step 0 towards 0 at ``cfg.steps``."""
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


def fingerprint(source: str, calib: Tensor, record: BaseRecord, cfg: TuneConfig) -> dict:
    """What a resumed run must share with the interrupted one: the source folder's manifest,
    the windows, the teacher's record and the settings (the checkpoint interval aside)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"}
    teacher = tensor_digest((f"w{i}", w.topk_logp) for i, w in enumerate(record.windows))
    return {"source": source, "calibration": windows_digest(calib), "teacher": teacher,
            "settings": settings}  # fmt: skip


def distill(
    model: nn.Module,
    calib: Tensor,
    record: BaseRecord,
    cfg: TuneConfig,
    device: torch.device,
    checkpoint: Path | None = None,
    fingerprint_: dict | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> tuple[list[float], dict[str, Any]]:
    """Train the ranges (and norms) of ``model``'s packed linears in place, then write them back.

    Args:
        model: a model with :class:`PackedLinear` layers, on ``device``.
        calib: (n, seqlen) calibration windows; record: the teacher's record of them.
        checkpoint: ``OUTPUT.partial`` (None: no checkpoints); ``fingerprint_`` goes into it.
        resume: continue from the checkpoint's state.
    Returns:
        ``(losses, info)``: the mean KL of every step's windows, and the numbers of the run
        (KL on the check windows before, after training and after rounding; the scales).
    """
    record.check(calib)
    n_check = min(cfg.check_windows, len(calib))
    info: dict[str, Any] = {"kl_check_before": mean_kl(model, calib, record, n_check, device)}
    with tunable(model, cfg.tune_norms) as params:
        names = list(params)
        opt = torch.optim.Adam(params.values(), lr=cfg.lr)
        losses: list[float] = []
        start = 0
        if resume and checkpoint is not None:
            state = load_state(checkpoint, fingerprint_ or {})
            start, losses = state.apply(params, opt)
            log.info("resuming after step %d of %d from %s", start, cfg.steps, checkpoint)
        disable = None if progress is None else not progress  # None: on a terminal only
        bar = tqdm(range(start, cfg.steps), desc="tune", disable=disable, initial=start,
                   total=cfg.steps)  # fmt: skip
        every = max(1, cfg.steps // 10)  # without a bar, a log line now and then
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i in batch_windows(step, len(calib), cfg):
                with training_precision(cfg, device):
                    loss = window_kl(model, calib[i], record.windows[i], device) / cfg.batch
                loss.backward()
                total += float(loss.detach())
            opt.step()
            with torch.no_grad():  # the scale's floor also where Adam went below it
                for layer in tunable_layers(model).values():
                    layer.scale.clamp_(min=MIN_SCALE)
            losses.append(total)
            recent = losses[-max(1, min(len(losses), 20)) :]
            bar.set_postfix(kl=f"{sum(recent) / len(recent):.4f}")
            if bar.disable and progress is not False and (step + 1) % every == 0:
                progress_log.info("tune: step %d of %d, KL %.4f", step + 1, cfg.steps, total)
            done = step + 1
            if checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save_state(checkpoint, TuneState.of(fingerprint_ or {}, done, losses, params, opt))
        bar.close()
        info["kl_check_trained"] = mean_kl(model, calib, record, n_check, device)
        info |= write_back(model)
        info["tuned_parameters"] = sum(p.numel() for p in params.values())
        info["trainable"] = sorted({n.rpartition(".")[2] for n in names})
    info["kl_check_rounded"] = mean_kl(model, calib, record, n_check, device)
    return losses, info


# ----------------------------------------------------------------------------- the stage


def tune_model(
    model: nn.Module,
    calib: Tensor,
    teacher: TeacherRecords,
    cfg: TuneConfig,
    *,
    device: torch.device,
    eval_sets: dict[str, Tensor] | None = None,
    source: str = "",
    output: Path | None = None,
    tokenizer: Any = None,
    qconfig: dict | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    seconds: dict[str, float] | None = None,
) -> TuneResult:
    """The stage after the teacher's records: scores before, training, scores after, save
    (with ``output``); ``model`` is tuned in place.

    Args:
        source: the saved folder's manifest digest (what a checkpoint must match).
        output: the tuned folder (None: not saved, no checkpoint); needs ``qconfig``, the source
            folder's ``quantization_config``, and ``tokenizer``.
    """
    sets = eval_sets or {}
    seconds = dict(seconds or {})
    if cfg.train_dtype == "auto":
        cfg = replace(cfg, train_dtype=resolve_train_dtype("auto", device))
        log.info("training steps in %s (--train-dtype auto)", cfg.train_dtype)
    record, records = teacher.calibration, teacher.sets
    model.to(device)
    before = evaluate(model, sets, records, device, "before", seconds)
    ckpt = None if output is None else partial_dir(output)
    lock = None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        lock = hold(ckpt)
    try:
        t = time.perf_counter()
        progress_log.info("stage tune: %d steps of %d window(s)", cfg.steps, cfg.batch)
        fp = fingerprint(source, calib, record, cfg)
        losses, info = distill(model, calib, record, cfg, device, ckpt, fp, resume, progress)
        seconds["tune"] = time.perf_counter() - t
        after = evaluate(model, sets, records, device, "after", seconds)
        model.to("cpu")
        tail = losses[-max(1, len(losses) // 10) :]
        tuning = {
            **asdict(cfg),
            "calibration_windows": list(calib.shape),
            "base": teacher.name,
            "kl_first_steps": sum(losses[: len(tail)]) / len(tail),
            "kl_final_steps": sum(tail) / len(tail),
            **info,
        }
        report = {
            "tuning": tuning,
            "perplexity": {
                n: {
                    "float": teacher.perplexity.get(n),
                    "before": before[n][0],
                    "after": after[n][0],
                }
                for n in sets
            },  # fmt: skip
            "divergence": {n: {"before": before[n][1], "after": after[n][1]} for n in sets},
            "seconds": seconds,
        }
        if output is not None:
            t = time.perf_counter()
            report["output"] = str(save_tuned(output, model, tokenizer, qconfig, report, force))
            seconds["save"] = time.perf_counter() - t
    finally:
        if lock is not None:
            os.close(lock)
        # a run stopped before its first checkpoint leaves nothing that asks for --resume
        if ckpt is not None and not (ckpt / STATE_FILE).is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
    if ckpt is not None and output.exists():
        shutil.rmtree(ckpt, ignore_errors=True)  # the save landed: the checkpoint has served
    return TuneResult(report, losses, model)


def evaluate(model, sets, records, device, when, seconds) -> dict[str, tuple[float, Any]]:
    """Perplexity and KL against the teacher's records of every evaluation set."""
    if not sets:
        return {}
    t = time.perf_counter()
    progress_log.info("stage eval_%s: %d set(s)", when, len(sets))
    scored = score_sets(model, sets, device, when, base_records=records)
    seconds[f"eval_{when}"] = time.perf_counter() - t
    return {n: (s.perplexity, s.divergence) for n, s in scored.items()}


def save_tuned(
    output: Path, model: nn.Module, tokenizer: Any, qconfig: dict | None, report: dict, force: bool
) -> Path:
    """Save the tuned model with the source's ``quantization_config``, its ``tuning`` block
    added and its measured numbers replaced by the tuned model's (the save path of
    :mod:`baq.saved.storage`: same file layout, same code bytes)."""
    from baq.saved.storage import save_packed

    if qconfig is None:
        raise ValueError("saving a tuned model needs its source folder's quantization_config")
    qc = copy.deepcopy(qconfig)
    summary = {k: v for k, v in (qc.get("summary") or {}).items()
               if k not in ("perplexity_after", "divergence")}  # fmt: skip
    after = {n: p["after"] for n, p in report["perplexity"].items()}
    if after:
        summary["perplexity_after"] = after
        summary["divergence"] = {
            n: d["after"] for n, d in report["divergence"].items() if d["after"]
        }
    qc["summary"] = summary
    qc["tuning"] = json.loads(json.dumps(report["tuning"], default=str))
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    return save_packed(output, model, tokenizer, packed, qc, force)

"""One quantization run, composed once: measure, plan, quantize, evaluate, save, report.

``baq quantize``, ``baq bench`` and :func:`baq.quantize` all run :func:`run_session`, so the
library, the command line and the benchmark give the same run for the same settings (the
model-level allocation of DESIGN.md section 1 included: a config that asks for it always gets
its measurement and plan). The stages, in order, each timed in the report's ``seconds``:

1. ``eval_before``: the float model's perplexity on each evaluation set, and its compact base
   record (the top tokens per position) that the KL divergence of the quantized model reads;
2. ``measure``: with ``allocation="model"``, the measurement pass (:mod:`baq.run.measure`) of
   the float model, or a measurement given, or the one kept by an interrupted run;
3. ``quantize``: the sequential pass (:mod:`baq.run.quantization`), with the plan
   (:mod:`baq.run.allocation`), checkpointed block by block when there is an output folder;
4. ``eval_after``: perplexity and KL divergence of the quantized model;
5. ``save``: the packed folder (:mod:`baq.saved.storage`), then the checkpoint is removed;
6. the report (:mod:`baq.run.report`), written as JSON when asked.

The settings are a frozen :class:`Session`; nothing here parses arguments or prints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from baq.config import DEFAULT_TOPK, QuantConfig
from baq.run import checkpoint, measure, report, streaming
from baq.run.allocation import LayerPlan, plan_bits, plan_levels
from baq.run.quantization import QuantRun, quantize_model
from baq.saved.shards import DEFAULT_MAX_SHARD_SIZE

if TYPE_CHECKING:
    from baq.data import CalibConfig
    from baq.eval.divergence import BaseRecord
    from baq.model.lazy import LazyLoader

log = logging.getLogger(__name__)
progress_log = logging.getLogger("baq.progress")  # one line per stage

# the measurement of a run with an output folder, kept in its checkpoint so a resumed run plans
# with the same numbers
MEASUREMENT_IN_CHECKPOINT = "measurement.safetensors"


@dataclass(frozen=True)
class Session:
    """What one run does besides the :class:`~baq.config.QuantConfig`.

    Attributes:
        cfg: the quantization settings.
        device: where blocks run ("auto": CUDA when present).
        output: save the packed model in this folder (None: no save, no checkpoint).
        force: replace a previous save at ``output``.
        max_shard_size: bytes above which a saved weight file is split into shards.
        resume: continue the interrupted run checkpointed in ``OUTPUT.partial``.
        measurement: a measurement to plan with (``baq measure``'s), instead of measuring.
        max_activation_bytes: RAM budget of each calibration activation store (None: no limit).
        evaluate_before: score the float model first (perplexity, and the KL's base records).
        report_path: write the JSON report here.
        model_name: the model's name in the report.
        memory_plan: the memory plan the run was admitted with, for the report.
        progress: progress bars (None: on a terminal; log lines otherwise).
    """

    cfg: QuantConfig = field(default_factory=QuantConfig)
    device: str = "auto"
    output: Path | None = None
    force: bool = False
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    resume: bool = False
    measurement: measure.Measurement | None = None
    max_activation_bytes: int | None = None
    evaluate_before: bool = True
    report_path: Path | None = None
    model_name: str = "model"
    memory_plan: dict[str, Any] | None = None
    progress: bool | None = None


@dataclass
class SessionResult:
    """What :func:`run_session` produced.

    Attributes:
        run: the quantization pass's results and per-layer records.
        report: the run report (:func:`baq.run.report.build_report`).
        base_records: evaluation set -> the float model's compact base record (for later KL).
        measurement: the measurement the plan came from (model allocation), else None.
    """

    run: QuantRun
    report: dict[str, Any]
    base_records: dict[str, Any] = field(default_factory=dict)
    measurement: measure.Measurement | None = None

    @property
    def results(self) -> dict[str, Any]:
        """Full linear name -> solver result (what :func:`baq.save` packs)."""
        return self.run.results

    @property
    def records(self) -> list[Any]:
        return self.run.records

    @property
    def nominal_bits(self) -> float:
        return self.run.nominal_bits


def run_session(
    model: nn.Module,
    tokenizer: Any,
    calib: Tensor,
    session: Session,
    eval_sets: dict[str, Tensor] | None = None,
    calib_config: CalibConfig | None = None,
    loader: LazyLoader | None = None,
    base_records: dict[str, BaseRecord] | None = None,
    measurement_source: Any = None,
    seconds: dict[str, float] | None = None,
) -> SessionResult:
    """Quantize ``model`` in place with ``session.cfg`` and everything around it.

    Args:
        model: the causal LM (whole, or the skeleton of a lazy one).
        tokenizer: saved beside the model.
        calib: (nsamples, seqlen) int64 calibration windows.
        session: the settings.
        eval_sets: evaluation set name -> (n, eval_seqlen) windows (None: no evaluation).
        calib_config: how ``calib`` was drawn, for the report.
        loader: the model's :class:`~baq.model.lazy.LazyLoader`, or None.
        base_records: the float model's compact base records, when already known (the bench
            caches them); the before evaluation then only gives perplexity if asked.
        measurement_source: ``(model, calib, cfg, device) -> Measurement`` that finds or makes
            the measurement (the bench's cache); default: measure now, kept in the checkpoint.
        seconds: stages the caller already ran (loading, data), first in the report's seconds.
    Returns:
        The :class:`SessionResult`.
    """
    from baq.model import loader as models

    cfg = session.cfg
    sets = eval_sets or {}
    device = models.resolve_device(session.device)
    seconds = dict(seconds or {})
    before: dict[str, float] = {}
    records = dict(base_records or {})
    if sets and session.evaluate_before:
        t = time.perf_counter()
        progress_log.info("stage eval_before: %d set(s)", len(sets))
        topk = None if base_records else DEFAULT_TOPK
        scored = score_model(model, sets, device, "before", loader, record_topk=topk)
        before = {name: sc.perplexity for name, sc in scored.items()}
        if not base_records:
            records = {name: sc.base_record for name, sc in scored.items()}
        seconds["eval_before"] = time.perf_counter() - t

    ckpt, done = open_checkpoint(model, calib, cfg, session, loader)
    plan = meas = None
    if cfg.allocation == "model":
        t = time.perf_counter()
        progress_log.info("stage measure")
        folder = None if ckpt is None else ckpt.folder
        try:
            meas, measured = measurement_for(
                model, calib, session, device, loader, folder, measurement_source
            )
        except ValueError:  # a refused measurement leaves no checkpoint asking for --resume
            if ckpt is not None:
                ckpt.discard_if_new()
            raise
        plan = plan_of(meas, cfg)
        if measured:
            seconds["measure"] = time.perf_counter() - t
    progress_log.info("stage quantize: %s at %g bits", cfg.method, cfg.bits)
    try:
        run = quantize_model(
            model,
            calib,
            cfg,
            device=device,
            progress=session.progress,
            on_block_done=None if ckpt is None else ckpt.save_block,
            start_block=done,
            restore_block=None if ckpt is None else ckpt.load_block,
            loader=loader,
            max_activation_bytes=session.max_activation_bytes,
            plan=plan,
        )
    except KeyboardInterrupt:
        if ckpt is not None:
            log.warning("finished blocks kept in %s: rerun with --resume", ckpt.folder)
        raise
    seconds["quantize"] = run.seconds

    after: dict[str, float] = {}
    kl: dict[str, dict[str, float]] = {}
    if sets:
        t = time.perf_counter()
        progress_log.info("stage eval_after: %d set(s)", len(sets))
        on_load = None if loader is None else streaming.quantized_on_load(loader, run.results)
        base = {k: v for k, v in records.items() if v is not None}
        scored = score_model(model, sets, device, "after", loader, on_load, base_records=base)
        after = {name: sc.perplexity for name, sc in scored.items()}
        kl = {name: sc.divergence for name, sc in scored.items() if sc.divergence}
        seconds["eval_after"] = time.perf_counter() - t

    storage_bits = folder_bytes = None
    if session.output is not None:
        from baq.saved import storage
        from baq.saved.manifest import folder_bytes as size_of

        t = time.perf_counter()
        progress_log.info("stage save: %s", session.output)
        if loader is None:
            model.to("cpu")
        summary = {"nominal_bits": run.nominal_bits, "perplexity_after": after, "divergence": kl}
        storage.save_quantized(
            session.output, model, tokenizer, run.results, cfg, summary, session.force,
            loader=loader, max_shard_size=session.max_shard_size,
        )  # fmt: skip
        storage_bits = storage.storage_bits(session.output)
        folder_bytes = size_of(session.output)
        seconds["save"] = time.perf_counter() - t
        ckpt.remove()  # the save landed: the checkpoint has served
    else:
        from baq.saved.packed_linear import storage_bits_of

        storage_bits = storage_bits_of(run.results)

    rep = report.build_report(
        model=session.model_name,
        quant=asdict(cfg),
        calib={} if calib_config is None else asdict(calib_config),
        records=run.records,
        seconds=seconds,
        perplexity={k: {"before": before.get(k), "after": after.get(k)} for k in sets},
        storage_bits=storage_bits,
        divergence=kl,
        memory_plan=session.memory_plan,
        folder_bytes=folder_bytes,
        parameters=report.parameter_count(model),
    )
    if session.report_path is not None:
        report.write_json(session.report_path, rep)
    return SessionResult(run, rep, records, meas)


def score_model(
    model: nn.Module,
    sets: dict[str, Tensor],
    device: torch.device,
    when: str,
    loader: LazyLoader | None = None,
    on_load: Any = None,
    **base: Any,
) -> dict[str, Any]:
    """Scores (:func:`baq.eval.scoring.score_sets`) of the model on the device and back.

    A lazily loaded model streams its blocks from disk as the forward reaches them: memory stays
    one block, at the price of reading every block once per window (the page cache serves
    repeats when the model fits in it); ``on_load`` writes the quantized weights into each block
    as it is loaded (after quantization).
    """
    from baq.eval.scoring import score_sets

    if loader is None:
        model.to(device)
        try:
            return score_sets(model, sets, device, when, **base)
        finally:
            model.to("cpu")
    loader.to(device)
    try:
        with loader.streaming(on_load=on_load):
            return score_sets(loader.model, sets, device, when, **base)
    finally:
        loader.to("cpu")


def open_checkpoint(
    model: nn.Module,
    calib: Tensor,
    cfg: QuantConfig,
    session: Session,
    loader: LazyLoader | None,
) -> tuple[checkpoint.Checkpoint | None, int]:
    """The run's checkpoint in ``OUTPUT.partial`` (None without an output) and how many blocks
    an interrupted run finished (0 for a new run)."""
    if session.output is None:
        return None, 0
    # a lazy model is hashed a block at a time, read from disk: the digest of a full load
    tensors = None if loader is None else streaming.state_items(model, loader)
    ckpt = checkpoint.Checkpoint(
        checkpoint.partial_dir(session.output),
        checkpoint.fingerprint(model, calib, cfg, tensors),
    )
    ckpt.map_codes = loader is not None  # a lazy run's results live in the checkpoint's files
    done = ckpt.open(resume=session.resume)
    if done:
        log.info("resuming after %d finished blocks from %s", done, ckpt.folder)
    return ckpt, done


def measurement_for(
    model: nn.Module,
    calib: Tensor,
    session: Session,
    device: torch.device,
    loader: LazyLoader | None,
    checkpoint_folder: Path | None,
    source: Any = None,
) -> tuple[measure.Measurement, bool]:
    """The model allocation's measurement: the session's own, the one the interrupted run kept
    in its checkpoint, the ``source``'s, or measured now (and kept in the checkpoint).

    Returns:
        ``(measurement, whether it was measured now)``; it has been checked against this model,
        these windows and these settings.
    """
    cfg = session.cfg
    items = model.state_dict().items() if loader is None else streaming.state_items(model, loader)
    settings = measure.settings_of(checkpoint.tensor_digest(items), calib, cfg)
    kept = None if checkpoint_folder is None else checkpoint_folder / MEASUREMENT_IN_CHECKPOINT
    meas, measured = session.measurement, False
    if meas is None and kept is not None and kept.is_file():
        meas = measure.Measurement.load(kept)
        log.info("measurement of the interrupted run read from %s", kept)
    if meas is None and source is not None:
        meas, measured = source(model, calib, cfg, device)
    if meas is None:
        meas = measure.measure_model(
            model,
            calib,
            cfg,
            (cfg.importance,),
            device,
            settings["model"],
            progress=session.progress,
            max_activation_bytes=session.max_activation_bytes,
            loader=loader,
        )
        measured = True
    meas.check(settings)
    meas.check_layers(model)
    meas.betas(cfg.importance)
    if kept is not None and not kept.is_file():  # kept once checked
        meas.save(kept)
    return meas, measured


def plan_of(meas: measure.Measurement, cfg: QuantConfig) -> dict[str, LayerPlan]:
    """Linear name -> planned level counts of the model allocation at ``cfg.bits``."""
    plans = plan_levels(meas, cfg)
    log.info("model allocation planned: %.4f nominal bits", plan_bits(plans))
    return {p.name: p for p in plans}

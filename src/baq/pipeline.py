"""The sequential layer-by-layer driver (DESIGN.md section 3; GPTQ's sequential protocol).

Block ``i`` is calibrated on the outputs of the already-quantized blocks before it: one forward
of the block over the calibration inputs accumulates every linear's Hessian proxy
``H = 2 X X^T / n`` (forward hooks, removed on exit), each linear is solved with RTN, GPTQ or BAQ
and written back, and a second forward of the quantized block gives the next block's inputs.
Only the block being solved sits on the accelerator; the activations stay on the host, in an
:class:`~baq.activations.ActivationStore` that spills to disk beyond ``max_activation_bytes``.
With a ``LazyLoader`` (``baq.lazy``) each block is also read from disk just before its Hessian
pass and released after its outputs are computed, so host memory does not grow with depth.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import adadim_block, blocks, head, models, streaming
from .activations import ActivationStore
from .config import QuantConfig
from .hessian import StopForward, hessian_hooks
from .memory_plan import retry_halving
from .quant.gptq import QuantResult
from .quant.grid import Grid
from .quant.layer import LayerRecord, quantize_layer

if TYPE_CHECKING:
    from .lazy import LazyLoader
    from .plan import LayerPlan

log = logging.getLogger(__name__)


@dataclass
class QuantRun:
    """Everything a quantization produced.

    Attributes:
        results: full module name (as in ``model.named_modules()``) -> result, tensors on the CPU.
        records: one :class:`LayerRecord` per quantized linear, in order.
        seconds: wall time of the whole quantization (capture, Hessians, solves, propagation).
    """

    results: dict[str, QuantResult] = field(default_factory=dict)
    records: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def nominal_bits(self) -> float:
        """Mean of log2 L over all quantized weights (layers weighted by their size)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.records)
        bits = sum(r.nominal_bits * r.shape[0] * r.shape[1] for r in self.records)
        return bits / total if total else 0.0


def is_skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """A linear named ``name`` matches a ``--skip`` pattern (fnmatch on the full or short name)."""
    short = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(short, p) for p in patterns)


def block_targets(block: nn.Module, prefix: str, skip: tuple[str, ...]) -> dict[str, nn.Module]:
    """The block's linears to quantize (short name -> module): all but the ``--skip`` matches of
    their full names ``prefix + name``."""
    return {n: m for n, m in blocks.linears(block).items() if not is_skipped(prefix + n, skip)}


def check_finite(name: str, W: Tensor) -> None:
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"weight {name} contains {bad} NaN/Inf values: the checkpoint is damaged")


def quantize_model(
    model: nn.Module,
    calib_ids: Tensor,
    cfg: QuantConfig,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    on_block_done: Callable[[int, dict[str, QuantResult], list[LayerRecord]], None] | None = None,
    batch_size: int | None = None,
    batch_tokens: int = 4096,
    start_block: int = 0,
    restore_block: Callable[[int], tuple[dict[str, QuantResult], list[LayerRecord]]] | None = None,
    loader: LazyLoader | None = None,
    max_activation_bytes: int | None = None,
    plan: dict[str, LayerPlan] | None = None,
) -> QuantRun:
    """Quantize every linear layer of every decoder block, in place, block by block; with
    ``cfg.include_head`` the output head too, as one more layer after the last block
    (:mod:`baq.head`).

    Args:
        model: a Hugging Face causal LM (on the CPU or on ``device``).
        calib_ids: (nsamples, seqlen) int64 calibration token windows.
        cfg: the settings.
        device: where blocks and solves run (default: CUDA when present, else CPU).
        progress: show a progress bar (None: only on a terminal).
        on_block_done: called after each quantized block with its index, results and records
            (checkpoints); the head is stage ``len(blocks)``, after the last block.
        batch_size: calibration samples per block forward; default: as many as fit in
            ``batch_tokens`` tokens, if batching reproduces the one-sample outputs on block 0.
        batch_tokens: token budget of one batched forward.
        start_block: blocks before this one were quantized by an interrupted run: their results
            come from ``restore_block(i)`` and they are only run forward, to recompute the next
            block's inputs exactly as the interrupted run saw them. ``len(blocks) + 1`` with
            the head: the head was finished too.
        restore_block: block index -> ``(results, records)`` saved by ``on_block_done``.
        loader: the :class:`baq.lazy.LazyLoader` of a model opened with ``open_lazy``: each
            block is read from disk before its Hessian pass and released after its outputs are
            computed, and results are kept compact (``streaming.compact``: no float weight), so
            host memory stays about one block plus the activations whatever the depth.
        max_activation_bytes: RAM budget of the calibration activations (each of the input and
            output stores of a block); beyond it they spill to a temporary file. None: in RAM.
        plan: full linear name -> planned level counts of the model-level allocation
            (``baq.plan``); each layer is then one GPTQ solve with its planned levels.
    Returns:
        The :class:`QuantRun`. Without a loader the model's linears now hold the dequantized
        weights; with one the blocks are released again (run the quantized model with
        ``loader.streaming(on_load=streaming.quantized_on_load(loader, run.results))``).
    """
    device = models.resolve_device("auto" if device is None else str(device))
    hdtype = torch.float64 if cfg.hessian_dtype == "float64" else torch.float32
    t0 = time.perf_counter()
    run = QuantRun()
    layers = blocks.decoder_layers(model)
    prefix = blocks.module_prefix(model, layers)
    # RTN reads no data: no capture, no propagation, just the grid on every weight
    inputs, kwargs, batch = _NoInputs(), {}, 1
    if cfg.method != "rtn":
        with torch.inference_mode():
            inputs, kwargs = streaming.capture_inputs(
                model, calib_ids, device, max_activation_bytes
            )
        kwargs = blocks.move_kwargs(kwargs, device)
        log.info("captured %d calibration inputs of %d tokens", len(inputs), calib_ids.shape[1])
        if inputs.spilled:
            log.info("calibration activations spill to %s", inputs.path)

    compact = loader is not None
    # checked before any block is solved: a refusal after all of them would waste the run
    head_target = head.head_target(model) if cfg.include_head else {}
    for name in head_target:
        if is_skipped(name, cfg.skip):
            raise ValueError(f"--include-head quantizes {name}, which --skip names: drop one")
    # the head is quantized unless a resumed run finished it already
    head_next = bool(head_target) and start_block <= len(layers)
    bar = tqdm(
        range(len(layers)), desc=f"{cfg.method} {cfg.bits:g} bits", disable=bar_disabled(progress)
    )
    try:
        for i in bar:
            block, home = streaming.open_block(model, i, device, loader)
            targets = block_targets(block, f"{prefix}{i}.", cfg.skip)
            if i == 0 and not isinstance(inputs, _NoInputs):
                batch = batch_size or batch_size_for(block, inputs, kwargs, device, batch_tokens)
            if i < start_block:
                _restore(block, targets, f"{prefix}{i}.", restore_block, i, run, compact)
            else:
                batch = _solve_block(
                    block,
                    targets,
                    f"{prefix}{i}.",
                    inputs,
                    kwargs,
                    device,
                    batch,
                    cfg,
                    hdtype,
                    run,
                    compact=compact,
                    plan=plan,
                )
            # the last block's outputs feed only the head: its forward is skipped without one
            if not isinstance(inputs, _NoInputs) and (i + 1 < len(layers) or head_next):
                with torch.inference_mode():  # on CUDA, out of memory retries half the batch
                    forward = partial(forward_all, block, inputs, kwargs, device, keep=True)
                    outputs, batch = retry_halving(forward, batch)
                inputs.close()
                inputs = outputs
            del block
            streaming.close_block(model, i, home, loader)
            run.seconds = time.perf_counter() - t0
            if on_block_done is not None and i >= start_block:
                names = [f"{prefix}{i}.{name}" for name in targets]
                block_records = run.records[len(run.records) - len(names) :]
                on_block_done(i, {n: run.results[n] for n in names}, block_records)
        if head_target:  # stage len(layers), one more layer after the last block
            (name,) = head_target
            if len(layers) < start_block:
                _restore(model, head_target, "", restore_block, len(layers), run, compact)
            else:
                hessians = {}
                if not isinstance(inputs, _NoInputs):
                    hessians[name] = head.head_hessian(model, inputs, device, batch, hdtype)
                solve_targets(head_target, "", hessians, cfg, run, compact, plan)
                run.seconds = time.perf_counter() - t0
                if on_block_done is not None:
                    on_block_done(len(layers), {name: run.results[name]}, run.records[-1:])
            head.log_tie(model)
    finally:
        inputs.close()
    run.seconds = time.perf_counter() - t0
    return run


class _NoInputs:
    """Stands in for the activations of a method that reads none (RTN)."""

    def close(self) -> None:
        pass


def _solve_block(
    block: nn.Module,
    targets: dict[str, nn.Module],
    prefix: str,
    inputs: ActivationStore,
    kwargs: dict,
    device: torch.device,
    batch: int,
    cfg: QuantConfig,
    hdtype: torch.dtype,
    run: QuantRun,
    compact: bool,
    plan: dict[str, LayerPlan] | None = None,
) -> int:
    """Hessians from one forward over ``inputs``, then each linear solved and written back.

    Returns the batch size the forward used (halved when CUDA ran out of memory).
    """
    hessians: dict[str, Tensor] = {}
    if cfg.method != "rtn" and targets:

        def accumulate(b: int) -> dict[str, Tensor]:  # fresh accumulators on every try
            hooks = hessian_hooks(block, targets, hdtype, stop_early=True)
            with torch.inference_mode(), hooks as accs:
                forward_all(block, inputs, kwargs, device, b, keep=False)
            return {name: accs[name].hessian() for name in targets if name in accs}

        hessians, batch = retry_halving(accumulate, batch)
    dims = None
    if cfg.dim == "auto" and cfg.adadim == "block" and targets:
        planned = {n: p.levels for n in targets if plan and (p := plan.get(f"{prefix}{n}"))}
        dims = adadim_block.choose_dims(block, targets, inputs, kwargs, device, cfg, planned)
    solve_targets(targets, prefix, hessians, cfg, run, compact, plan, dims)
    return batch


def solve_targets(
    targets: dict[str, nn.Module],
    prefix: str,
    hessians: dict[str, Tensor],
    cfg: QuantConfig,
    run: QuantRun,
    compact: bool,
    plan: dict[str, LayerPlan] | None = None,
    dims: dict[str, str] | None = None,
) -> None:
    """Solve each linear of ``targets`` on its Hessian, write it back, add it to ``run``.

    Args:
        targets: name relative to ``prefix`` -> linear.
        prefix: the full name of the block with a trailing dot ("" for the head).
        hessians: name -> (cols, cols) Hessian, consumed; none for RTN.
        cfg, run, compact, plan: as in :func:`_solve_block`.
        dims: name -> AdaDim's grid dimension chosen by the block output criterion
            (:mod:`baq.adadim_block`); None: ``cfg.dim`` (with auto, the proxy criterion).
    """
    for name, mod in targets.items():
        full = f"{prefix}{name}"
        t = time.perf_counter()
        W = blocks.get_weight(mod)
        check_finite(full, W)
        planned = None if plan is None else plan.get(full)
        if plan is not None and planned is None:
            raise ValueError(f"the allocation plan has no levels for {full}: measure again")
        levels = None if planned is None else planned.levels
        res, rec = quantize_layer(
            W, hessians.pop(name, None), cfg, full, levels, (dims or {}).get(name)
        )
        if planned is not None:
            rec.beta, rec.modelled_loss = planned.beta, planned.modelled_loss
        blocks.set_weight(mod, res.weight)
        rec.seconds = time.perf_counter() - t
        run.results[full] = streaming.compact(res) if compact else _to_cpu(res)
        run.records.append(rec)
        log.info(
            "%s: %.3f bits, loss %.4g%s%s",
            full,
            rec.nominal_bits,
            rec.loss,
            "" if rec.predicted_gain is None else f", predicted gain {rec.predicted_gain:.3f}",
            "" if rec.percdamp in (None, cfg.percdamp) else f", percdamp {rec.percdamp:g}",
        )


def _restore(
    block: nn.Module,
    targets: dict[str, nn.Module],
    prefix: str,
    restore_block: Callable[[int], tuple[dict[str, QuantResult], list[LayerRecord]]] | None,
    index: int,
    run: QuantRun,
    compact: bool = False,
) -> None:
    """Put a finished block's saved results back into the model and the run."""
    if restore_block is None:
        raise ValueError("start_block > 0 needs restore_block")
    results, records = restore_block(index)
    expected = {f"{prefix}{name}" for name in targets}
    if set(results) != expected:
        raise ValueError(f"checkpoint of block {index} holds other layers than the model's")
    for name, mod in targets.items():
        blocks.set_weight(mod, streaming.weight_of(results[f"{prefix}{name}"]))
    if compact:
        results = {name: streaming.compact(res) for name, res in results.items()}
    run.results.update(results)
    run.records.extend(records)
    log.info("%s restored from the checkpoint", f"block {index}" if prefix else "the head")


def forward_all(
    block: nn.Module,
    inputs: ActivationStore,
    kwargs: dict,
    device: torch.device,
    batch: int,
    keep: bool,
) -> ActivationStore | None:
    """Run ``block`` over the (nsamples, seqlen, hidden) ``inputs`` in batches.

    Returns:
        With ``keep``, the outputs in a new store like ``inputs`` (same budget: they spill to
        disk too when the inputs do); else None (a forward for the Hessian hooks only).
    """
    outs = inputs.empty_like() if keep else None
    try:
        for s in range(0, len(inputs), batch):
            try:
                y = blocks.run_block(block, inputs[s : s + batch].to(device), kwargs)
            except StopForward:  # the Hessian hooks have all they need from this batch
                if keep:
                    raise
                continue
            if outs is not None:
                outs[s : s + batch] = y
    except BaseException:
        if outs is not None:
            outs.close()
        raise
    return outs


def batch_size_for(
    block: nn.Module, inputs: Tensor, kwargs: dict, device: torch.device, batch_tokens: int
) -> int:
    """Largest batch within ``batch_tokens`` tokens, if it reproduces one-sample forwards.

    The captured kwargs (masks, rotary tables) were recorded for one sample; most models
    broadcast them over a batch, but a model that does not gets one sample at a time.
    """
    want = max(1, min(len(inputs), batch_tokens // inputs.shape[1]))
    if want == 1:
        return 1
    with torch.inference_mode():
        x = inputs[:2].to(device)
        try:
            joint = blocks.run_block(block, x, kwargs)
        except (RuntimeError, ValueError) as err:
            log.info("batched block forward failed (%s); one sample at a time", err)
            return 1
        single = torch.cat([blocks.run_block(block, x[k : k + 1], kwargs) for k in range(2)])
    scale = single.abs().max().clamp(min=1e-6)
    if joint.shape != single.shape or not ((joint - single).abs().max() <= 1e-4 * scale):
        log.info("batched block forward differs from one-sample forwards; one at a time")
        return 1
    return want


def _to_cpu(res: QuantResult) -> QuantResult:
    g = res.grid
    return replace(
        res,
        weight=res.weight.cpu(),
        codes=res.codes.to(torch.int32).cpu(),
        grid=Grid(g.lo.cpu(), g.hi.cpu(), g.group_size, g.sym, g.dim),
        levels=res.levels.cpu(),
        losses=res.losses.cpu(),
    )


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` flag: None (only on a terminal) stays None."""
    return None if progress is None else not progress

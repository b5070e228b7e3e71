"""The sequential layer-by-layer driver (DESIGN.md section 3; GPTQ's sequential protocol).

Block ``i`` is calibrated on the outputs of the already-quantized blocks before it: one forward
of the block over the calibration inputs accumulates every linear's Hessian proxy
``H = 2 X X^T / n`` (forward hooks, removed on exit), each linear is solved with RTN, GPTQ or BAQ
and written back, and a second forward of the quantized block gives the next block's inputs.
Only the block being solved sits on the accelerator; the activations stay on the host, in an
:class:`~baq.run.activations.ActivationStore` that spills to disk beyond ``max_activation_bytes``.
With a ``LazyLoader`` (``baq.model.lazy``) each block is also read from disk just before its Hessian
pass and released after its outputs are computed, so host memory does not grow with depth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from baq.config import BATCH_TOKENS, QuantConfig
from baq.model import blocks
from baq.model import loader as models
from baq.quant.gptq import QuantResult
from baq.quant.grid import Grid
from baq.quant.layer import LayerRecord, layer_rotation, quantize_layer
from baq.quant.rotation import SUPPORTED
from baq.run import adadim_block, head, streaming
from baq.run.walker import BlockStep, BlockWalk, check_finite, is_skipped

if TYPE_CHECKING:
    from baq.model.lazy import LazyLoader
    from baq.run.allocation import LayerPlan

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


def quantize_model(
    model: nn.Module,
    calib_ids: Tensor,
    cfg: QuantConfig,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    on_block_done: Callable[[int, dict[str, QuantResult], list[LayerRecord]], Any] | None = None,
    batch_size: int | None = None,
    batch_tokens: int = BATCH_TOKENS,
    start_block: int = 0,
    restore_block: Callable[[int], tuple[dict[str, QuantResult], list[LayerRecord]]] | None = None,
    loader: LazyLoader | None = None,
    max_activation_bytes: int | None = None,
    plan: dict[str, LayerPlan] | None = None,
) -> QuantRun:
    """Quantize every linear layer of every decoder block, in place, block by block; with
    ``cfg.include_head`` the output head too, as one more layer after the last block
    (:mod:`baq.run.head`).

    Args:
        model: a Hugging Face causal LM (on the CPU or on ``device``).
        calib_ids: (nsamples, seqlen) int64 calibration token windows.
        cfg: the settings.
        device: where blocks and solves run (default: CUDA when present, else CPU).
        progress: show a progress bar (None: only on a terminal).
        on_block_done: called after each quantized block with its index, results and records
            (checkpoints); the head is stage ``len(blocks)``, after the last block. What it
            returns (results whose codes the checkpoint now holds on disk) replaces the run's
            results of those layers; None keeps them.
        batch_size: calibration samples per block forward; default: as many as fit in
            ``batch_tokens`` tokens, if batching reproduces the one-sample outputs on block 0.
        batch_tokens: token budget of one batched forward.
        start_block: blocks before this one were quantized by an interrupted run: their results
            come from ``restore_block(i)`` and they are only run forward, to recompute the next
            block's inputs exactly as the interrupted run saw them. ``len(blocks) + 1`` with
            the head: the head was finished too.
        restore_block: block index -> ``(results, records)`` saved by ``on_block_done``.
        loader: the :class:`baq.model.lazy.LazyLoader` of a model opened with ``open_lazy``: each
            block is read from disk before its Hessian pass and released after its outputs are
            computed, and results are kept compact (``streaming.compact``: no float weight), so
            host memory stays about one block plus the activations whatever the depth.
        max_activation_bytes: RAM budget of the calibration activations (each of the input and
            output stores of a block); beyond it they spill to a temporary file. None: in RAM.
        plan: full linear name -> planned level counts of the model-level allocation
            (``baq.run.allocation``); each layer is then one GPTQ solve with its planned levels.
    Returns:
        The :class:`QuantRun`. Without a loader the model's linears now hold the dequantized
        weights; with one the blocks are released again (run the quantized model with
        ``loader.streaming(on_load=streaming.quantized_on_load(loader, run.results))``).
    """
    if cfg.allocation == "model" and plan is None:
        # a per-layer run under a model-level config would be labelled "whole model" and is not
        raise ValueError(
            "allocation='model' needs the allocation plan of a measurement: run the whole "
            "session (baq.quantize or baq.run.session.run), or use allocation='layer'"
        )
    device = models.resolve_device("auto" if device is None else str(device))
    hdtype = torch.float64 if cfg.hessian_dtype == "float64" else torch.float32
    t0 = time.perf_counter()
    run = QuantRun()
    compact = loader is not None
    # checked before any block is solved: a refusal after all of them would waste the run
    head_target = head.head_target(model) if cfg.include_head else {}
    for name in head_target:
        if is_skipped(name, cfg.skip):
            raise ValueError(f"--include-head quantizes {name}, which --skip names: drop one")
    n_blocks = len(blocks.decoder_layers(model))
    # the head is quantized unless a resumed run finished it already
    head_next = bool(head_target) and start_block <= n_blocks
    walk = BlockWalk(
        model,
        None if cfg.method == "rtn" else calib_ids,  # RTN reads no data: no capture, no forward
        device,
        f"{cfg.method} {cfg.bits:g} bits",
        cfg.skip,
        loader,
        max_activation_bytes,
        batch_size,
        batch_tokens,
        keep_last=head_next,
        progress=progress,
    )
    with walk:
        for step in walk:
            if step.index < start_block:
                _restore(
                    step.block,
                    step.targets,
                    step.prefix,
                    restore_block,
                    step.index,
                    run,
                    cfg,
                    compact,
                )
                continue
            _solve_block(step, cfg, hdtype, run, compact, plan)
            run.seconds = time.perf_counter() - t0
            if on_block_done is not None:
                names = [f"{step.prefix}{name}" for name in step.targets]
                block_records = run.records[len(run.records) - len(names) :]
                kept = on_block_done(step.index, {n: run.results[n] for n in names}, block_records)
                run.results.update(kept or {})
        if head_target:  # stage n_blocks, one more layer after the last block
            (name,) = head_target
            if n_blocks < start_block:
                _restore(model, head_target, "", restore_block, n_blocks, run, cfg, compact)
            else:
                hessians = {}
                if walk.inputs is not None:
                    hessians[name] = head.head_hessian(
                        model, walk.inputs, device, walk.batch, hdtype
                    )
                solve_targets(head_target, "", hessians, cfg, run, compact, plan)
                run.seconds = time.perf_counter() - t0
                if on_block_done is not None:
                    kept = on_block_done(n_blocks, {name: run.results[name]}, run.records[-1:])
                    run.results.update(kept or {})
            head.log_tie(model)
    run.seconds = time.perf_counter() - t0
    return run


def _solve_block(
    step: BlockStep,
    cfg: QuantConfig,
    hdtype: torch.dtype,
    run: QuantRun,
    compact: bool,
    plan: dict[str, LayerPlan] | None = None,
) -> None:
    """Hessians from one forward over the block's inputs, then each linear solved and written
    back (the walk then runs the quantized block forward for the next block's inputs)."""
    hessians = step.hessians(hdtype) if cfg.method != "rtn" else {}
    dims = None
    if cfg.dim == "auto" and cfg.adadim == "block" and step.targets:
        planned = {
            n: p.levels for n in step.targets if plan and (p := plan.get(f"{step.prefix}{n}"))
        }
        dims = adadim_block.choose_dims(
            step.block, step.targets, step.inputs, step.kwargs, step.device, cfg, planned
        )
    solve_targets(step.targets, step.prefix, hessians, cfg, run, compact, plan, dims)


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
            (:mod:`baq.run.adadim_block`); None: ``cfg.dim`` (with auto, the proxy criterion).
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
        if cfg.rotate and res.rotation is None:
            log.warning(
                "%s: no randomized Hadamard transform of %d columns (sizes: %s): quantized "
                "unrotated",
                full,
                W.shape[1],
                SUPPORTED,
            )
        blocks.set_weight(mod, res.weight)
        rec.seconds = time.perf_counter() - t
        run.results[full] = streaming.compact(res) if compact else _to_cpu(res)
        run.records.append(rec)
        log.info(
            "%s: %.3f bits, loss %.4g%s%s%s",
            full,
            rec.nominal_bits,
            rec.loss,
            ", rotated" if rec.rotated else "",
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
    cfg: QuantConfig,
    compact: bool = False,
) -> None:
    """Put a finished block's saved results back into the model and the run.

    A checkpoint holds codes and ranges only; with ``cfg.rotate`` they are in each layer's
    rotated basis, whose seed the config and the layer's name give again (the resumed run's
    config is the interrupted one's: the checkpoint's fingerprint), so the result gets its
    ``rotation`` back and its weight in the original basis, as the solver wrote it."""
    if restore_block is None:
        raise ValueError("start_block > 0 needs restore_block")
    results, records = restore_block(index)
    expected = {f"{prefix}{name}" for name in targets}
    if set(results) != expected:
        raise ValueError(f"checkpoint of block {index} holds other layers than the model's")
    for name, res in list(results.items()):
        rot = layer_rotation(cfg, name, res.codes.shape[1])
        if rot is not None and res.rotation is None:
            res = replace(res, weight=None, rotation=rot.seed)
            results[name] = replace(res, weight=streaming.weight_of(res))
    for name, mod in targets.items():
        blocks.set_weight(mod, streaming.weight_of(results[f"{prefix}{name}"]))
    if compact:
        results = {name: streaming.compact(res) for name, res in results.items()}
    run.results.update(results)
    run.records.extend(records)
    log.info("%s restored from the checkpoint", f"block {index}" if prefix else "the head")


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

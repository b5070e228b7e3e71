"""One walk over the decoder blocks, shared by every pass that reads calibration activations.

GPTQ's sequential protocol (DESIGN.md section 1) and the measurement pass walk the model the same
way: block 0's inputs are captured from the model's own forward, then each block is opened (read
from disk with a :class:`~baq.model.lazy.LazyLoader`, moved to the device otherwise), handed to
the pass, run forward over the calibration inputs to give the next block's inputs, and closed.
:class:`BlockWalk` owns that loop, the activation stores (spilled to disk beyond a budget), the
batch size and the progress report; a pass only says what it does with each block (collect
Hessians, solve, restore from a checkpoint, choose a grid), so the quantization pass
(:mod:`baq.run.quantization`) and the measurement pass (:mod:`baq.run.measure`) stay apart and
neither borrows the other's helpers.

Progress: a tqdm bar on a terminal; elsewhere (nohup, CI logs, a notebook's captured output) the
bar is off and a log line every few blocks says the stage, the block, the seconds so far and an
estimate of the seconds left.
"""

from __future__ import annotations

import fnmatch
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from baq.config import BATCH_TOKENS
from baq.model import blocks
from baq.run import streaming
from baq.run.activations import ActivationStore
from baq.run.hessian import StopForward, hessian_hooks

if TYPE_CHECKING:
    from baq.model.lazy import LazyLoader

log = logging.getLogger(__name__)
# stage and progress lines: shown at the command line's default verbosity (cli/__init__.py)
progress_log = logging.getLogger("baq.progress")

T = TypeVar("T")

# log lines per walk when no progress bar shows (a line every tenth of the blocks)
LOG_LINES = 10


def is_skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """A linear named ``name`` matches a ``--skip`` pattern (fnmatch on the full or short name)."""
    short = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(short, p) for p in patterns)


def block_targets(block: nn.Module, prefix: str, skip: tuple[str, ...]) -> dict[str, nn.Module]:
    """The block's linears to quantize (short name -> module): all but the ``--skip`` matches of
    their full names ``prefix + name``."""
    return {n: m for n, m in blocks.linears(block).items() if not is_skipped(prefix + n, skip)}


def check_finite(name: str, W: Tensor) -> None:
    """Refuse a weight with NaN or Inf values before any solve reads it."""
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"weight {name} contains {bad} NaN/Inf values: the checkpoint is damaged")


def bar_disabled(progress: bool | None) -> bool:
    """tqdm's ``disable`` for a ``progress`` flag: None shows a bar only on a terminal."""
    if progress is None:
        return not sys.stderr.isatty()
    return not progress


class Progress:
    """A tqdm bar on a terminal, else a log line every few steps with the time left.

    Args:
        total: steps of the stage.
        stage: what the steps are ("quantize", "measure", ...), in the bar and the lines.
        progress: bar on (True), off (False) or only on a terminal (None).
        unit: what one step is, for the log lines ("block", "window").
    """

    def __init__(self, total: int, stage: str, progress: bool | None, unit: str = "block"):
        self.total, self.stage, self.unit = total, stage, unit
        self.quiet = bar_disabled(progress)
        self.bar = tqdm(total=total, desc=stage, disable=self.quiet)
        self.every = max(1, total // LOG_LINES)
        self.done = 0
        self.t0 = time.perf_counter()
        if self.quiet:
            progress_log.info("%s: %d %ss", stage, total, unit)

    def step(self) -> None:
        """One step finished."""
        self.done += 1
        self.bar.update(1)
        if self.quiet and (self.done % self.every == 0 or self.done == self.total):
            spent = time.perf_counter() - self.t0
            left = spent / self.done * (self.total - self.done)
            progress_log.info(
                "%s: %s %d of %d, %.0f s so far, about %.0f s left",
                self.stage,
                self.unit,
                self.done,
                self.total,
                spent,
                left,
            )

    def close(self) -> None:
        self.bar.close()


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
    block: nn.Module, inputs: ActivationStore, kwargs: dict, device: torch.device, batch_tokens: int
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


@dataclass
class BlockStep:
    """One open block of a :class:`BlockWalk`, handed to the pass.

    Attributes:
        index: the block's position.
        block: the block, on the device (real even when the model is lazy).
        prefix: its full module name with a trailing dot (``model.layers.3.``).
        targets: its linears to quantize or measure (short name -> module), ``--skip`` applied.
        inputs: its calibration inputs (None in a walk without data: RTN).
        kwargs: the block's captured keyword arguments, on the device.
        device: where the block runs.
        batch: calibration windows per forward (halved when CUDA runs out of memory).
        outputs: set by a pass whose own forward already gave the block's outputs (the
            measurement's Hessian forward on the float block); else the walk runs one.
    """

    index: int
    block: nn.Module
    prefix: str
    targets: dict[str, nn.Module]
    inputs: ActivationStore | None
    kwargs: dict
    device: torch.device
    batch: int
    outputs: ActivationStore | None = field(default=None, repr=False)

    def hessians(self, hdtype: torch.dtype, keep_outputs: bool = False) -> dict[str, Tensor]:
        """Every target's Hessian proxy ``H = 2 X X^T / n`` from one forward over the inputs.

        With ``keep_outputs`` the same forward gives the block's outputs (:attr:`outputs`, for a
        block the pass does not change); else each forward stops as soon as the hooks have their
        inputs.
        """
        if self.inputs is None or not self.targets:
            return {}

        def accumulate(b: int) -> dict[str, Tensor]:  # fresh accumulators on every try
            hooks = hessian_hooks(self.block, self.targets, hdtype, stop_early=not keep_outputs)
            with torch.inference_mode(), hooks as accs:
                out = forward_all(
                    self.block, self.inputs, self.kwargs, self.device, b, keep_outputs
                )
            if out is not None:
                self.outputs = out
            return {name: accs[name].hessian() for name in self.targets if name in accs}

        hessians, self.batch = retry_halving(accumulate, self.batch)
        return hessians


class BlockWalk:
    """Walk the decoder blocks in order with their calibration activations.

    Use as a context manager (the activation stores are closed on exit, spilled files deleted)
    and iterate: each :class:`BlockStep` is the open block; after the pass has finished with it,
    the walk runs the block forward to give the next block's inputs (unless the step's
    ``outputs`` were set, or the block is the last and ``keep_last`` is off), then closes it.
    After the loop, :attr:`inputs` holds the last block's outputs (with ``keep_last``: what
    the output head reads).

    Args:
        model: the causal LM (lazy or whole).
        calib_ids: (nsamples, seqlen) int64 windows, or None for a walk without data (RTN).
        device: where blocks run.
        stage: the progress label ("quantize", "measure").
        skip: ``--skip`` patterns of the targets.
        loader: the model's :class:`~baq.model.lazy.LazyLoader`, or None.
        max_activation_bytes: RAM budget of each activation store; beyond it they spill.
        batch_size: windows per forward; default as many as fit in ``batch_tokens``, if batching
            reproduces one-window forwards on block 0.
        batch_tokens: token budget of one batched forward.
        keep_last: also run the last block forward (its outputs feed the output head).
        progress: progress bar (None: on a terminal; log lines otherwise).
    """

    def __init__(
        self,
        model: nn.Module,
        calib_ids: Tensor | None,
        device: torch.device,
        stage: str,
        skip: tuple[str, ...] = (),
        loader: LazyLoader | None = None,
        max_activation_bytes: int | None = None,
        batch_size: int | None = None,
        batch_tokens: int = BATCH_TOKENS,
        keep_last: bool = False,
        progress: bool | None = None,
    ) -> None:
        self.model, self.calib_ids, self.device, self.stage = model, calib_ids, device, stage
        self.skip, self.loader, self.max_activation_bytes = skip, loader, max_activation_bytes
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.keep_last, self.progress = keep_last, progress
        self.layers = blocks.decoder_layers(model)
        self.prefix = blocks.module_prefix(model, self.layers)
        self.inputs: ActivationStore | None = None
        self.kwargs: dict = {}
        self.batch = 1

    def __len__(self) -> int:
        return len(self.layers)

    def __enter__(self) -> BlockWalk:
        if self.calib_ids is not None:
            with torch.inference_mode():
                self.inputs, kwargs = streaming.capture_inputs(
                    self.model, self.calib_ids, self.device, self.max_activation_bytes
                )
            self.kwargs = blocks.move_kwargs(kwargs, self.device)
            log.info(
                "%s: captured %d calibration inputs of %d tokens",
                self.stage,
                len(self.inputs),
                self.calib_ids.shape[1],
            )
            if self.inputs.spilled:
                log.info("calibration activations spill to %s", self.inputs.path)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.inputs is not None:
            self.inputs.close()

    def __iter__(self) -> Iterator[BlockStep]:
        bar = Progress(len(self.layers), self.stage, self.progress)
        try:
            for i in range(len(self.layers)):
                yield from self._visit(i)
                bar.step()
        finally:
            bar.close()

    def _visit(self, i: int) -> Iterator[BlockStep]:
        block, home = streaming.open_block(self.model, i, self.device, self.loader)
        try:
            prefix = f"{self.prefix}{i}."
            if i == 0 and self.inputs is not None:
                self.batch = self.batch_size or batch_size_for(
                    block, self.inputs, self.kwargs, self.device, self.batch_tokens
                )
            step = BlockStep(
                i,
                block,
                prefix,
                block_targets(block, prefix, self.skip),
                self.inputs,
                self.kwargs,
                self.device,
                self.batch,
            )
            yield step
            self.batch = step.batch
            outputs = step.outputs
            if self.inputs is not None and (i + 1 < len(self.layers) or self.keep_last):
                if outputs is None:
                    with torch.inference_mode():  # on CUDA, out of memory retries half the batch
                        forward = partial(
                            forward_all, block, self.inputs, self.kwargs, self.device, keep=True
                        )
                        outputs, self.batch = retry_halving(forward, self.batch)
                self.inputs.close()
                self.inputs = outputs
            elif outputs is not None:
                outputs.close()
        finally:
            del block
            streaming.close_block(self.model, i, home, self.loader)


def retry_halving(run: Callable[[int], T], batch: int) -> tuple[T, int]:
    """``run(batch)``, retried with half the batch while CUDA runs out of memory.

    ``run`` must start over from scratch on each call (a whole pass over the calibration set,
    with fresh Hessian accumulators), so a retry never counts a sample twice.

    Returns:
        ``(result, batch used)``; the caller keeps the smaller batch for later blocks.
    Raises:
        torch.OutOfMemoryError: still out of memory at batch 1.
    """
    while True:
        try:
            return run(batch), batch
        except torch.OutOfMemoryError:
            if batch <= 1:
                raise
        # out of the except block: the traceback's frames, and the tensors they hold, are gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch = max(1, batch // 2)
        log.warning("out of device memory in a block forward: retrying with batch %d", batch)

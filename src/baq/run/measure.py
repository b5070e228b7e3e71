"""The measurement pass of the model-level allocation (DESIGN.md section 1), a stage of its own.

Before any layer is quantized, the float model is measured once:

* per column, the sensitivity ``c_lj`` from the float model's Hessians (one block-by-block pass
  over the calibration windows, each block run once on the float outputs of the one before);
  analytic ``c_j = sum_r range_r^2 / (12 U_jj^2)`` by default, or measured from a uniform GPTQ
  solve (:func:`baq.quant.layer.column_sensitivity`);
* per layer, the importance ``beta_l`` of one unit of its proxy loss (:mod:`baq.run.importance`).

The :class:`Measurement` is a file of its own (safetensors with JSON metadata), reusable for any
budget: :mod:`baq.run.allocation` turns it into level counts in seconds. It records what it was
measured
on (model weights' hash, calibration windows' hash, settings) and refuses to serve another run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from baq.config import BATCH_TOKENS, IMPORTANCES, QuantConfig
from baq.errors import one_line
from baq.eval.divergence import windows_digest
from baq.model import blocks
from baq.quant.gptq import factor_hessian
from baq.quant.layer import column_sensitivity, grid_dim, layer_grid, layer_rotation, rotated_layer
from baq.run import adadim_block, head, importance
from baq.run.report import write_safetensors
from baq.run.walker import BlockWalk, check_finite

if TYPE_CHECKING:
    from baq.model.lazy import LazyLoader

log = logging.getLogger(__name__)

MEASUREMENT_FORMAT = "baq-measurement/1"
# why a lazily loaded model cannot have its noise importances measured (one line, with the fix)
NOISE_NEEDS_WHOLE_MODEL = (
    "--importance noise with --lazy: the noise estimator runs every block after each layer, so "
    "it needs the whole model in memory; drop --lazy, or use --importance fisher"
)
# QuantConfig fields a measurement depends on (bits only through measured sensitivities)
MEASURED_FIELDS = (
    "sensitivity",
    "dim",
    "group_size",
    "sym",
    "percdamp",
    "hessian_dtype",
    "range_dtype",
    "skip",
    "importance_samples",
)
# fields added later: recorded only when not at their default, and files without them read as at
# the default, so measurements written before them keep serving the runs they served
MEASURED_LATER: dict[str, Any] = {
    "include_head": False,
    "measure_samples": None,
    "adadim": "proxy",
    "clip": False,
    "rotate": False,  # the sensitivities are those of the rotated layers (quant/rotation.py)
    "rotate_seed": 0,  # recorded with rotate only: without it no layer's seed is used
}
# what a refusal calls a setting, where its key is not the flag
_LABELS = {
    "model": "model weights",
    "calib": "calibration windows",
    "include_head": "--include-head",
    "measure_samples": "--measure-samples",
    "adadim": "--adadim",
    "clip": "--clip",
    "rotate": "--rotate",
    "rotate_seed": "rotate_seed",
}


@dataclass
class Measurement:
    """Per-layer importances and per-column sensitivities of a float model.

    Attributes:
        names: full module names of the measured linears, in model order.
        shapes: (rows, cols) of each.
        sens: name -> (cols,) float64 sensitivities c_lj.
        beta: estimator ("fisher", "noise") -> name -> beta_l.
        settings: what the measurement depends on (see :func:`settings_of`).
        seconds: seconds of each stage ("sensitivity", "fisher", "noise").
    """

    names: list[str]
    shapes: list[tuple[int, int]]
    sens: dict[str, Tensor]
    beta: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def betas(self, estimator: str) -> Tensor:
        """(layers,) float64 beta of ``estimator``, in ``names`` order."""
        if estimator not in self.beta:
            have = ", ".join(self.beta) or "none"
            raise ValueError(
                f"the measurement has no {estimator} importances (it has {have}): measure "
                f"again with --importance {estimator}"
            )
        return torch.tensor([self.beta[estimator][n] for n in self.names], dtype=torch.float64)

    def check(self, settings: dict[str, Any], config_only: bool = False) -> None:
        """Refuse (``ValueError``, one line naming what differs) to serve another run.

        Args:
            settings: :func:`settings_of` the run.
            config_only: compare the settings only, not the weights and calibration windows
                (before the model is loaded).
        """
        keys = sorted((set(settings) | set(self.settings)) - {"bits"})
        if config_only:
            keys = [k for k in keys if k not in ("model", "calib")]

        def get(d: dict[str, Any], k: str) -> Any:
            return d.get(k, MEASURED_LATER.get(k))

        diff = [k for k in keys if get(settings, k) != get(self.settings, k)]
        if depends_on_bits(self.settings) and settings.get("bits") != self.settings.get("bits"):
            diff.append("bits (the probe budget: measured sensitivities, clipping, AdaDim)")
        if diff:
            what = ", ".join(_LABELS.get(k, k) for k in diff)
            raise ValueError(
                f"the measurement was made for another run ({what} differ): measure again "
                "with baq measure, or drop --measurement"
            )

    def check_layers(self, model: nn.Module) -> None:
        """Refuse (``ValueError``, one line) a measurement whose layers are not ``model``'s
        linears with the recorded ``(rows, cols)``: hand-edited shapes would price every
        weight wrongly."""
        modules = dict(model.named_modules())
        for name, shape in zip(self.names, self.shapes):
            module = modules.get(name)
            actual = None if module is None else tuple(blocks.get_weight(module).shape)
            if actual != tuple(shape):
                what = "is not a layer of the model" if module is None else f"is {actual}"
                raise ValueError(
                    f"the measurement's layer {name} {tuple(shape)} {what}: it was made for "
                    "another model; measure again with baq measure, or drop --measurement"
                )

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file, written atomically: ``sens/<name>`` tensors, JSON metadata."""
        meta = {
            "format": MEASUREMENT_FORMAT,
            "names": json.dumps(self.names),
            "shapes": json.dumps(self.shapes),
            "beta": json.dumps(self.beta),
            "settings": json.dumps(self.settings, sort_keys=True),
            "seconds": json.dumps(self.seconds),
        }
        tensors = {f"sens/{n}": self.sens[n].double().contiguous() for n in self.names}
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Measurement:
        """Read a measurement file and check everything in it (:func:`check_measurement`).

        Raises:
            ValueError: one line naming the file and the problem.
        """
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != MEASUREMENT_FORMAT:
                    raise ValueError("not a baq measurement")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error type on a damaged header
            raise ValueError(
                f"{path}: not a readable measurement ({one_line(err)}); write one with baq measure"
            ) from None
        return check_measurement(path, meta, tensors)


def check_measurement(
    path: str | os.PathLike, meta: dict[str, str], tensors: dict[str, Tensor]
) -> Measurement:
    """A :class:`Measurement` from a file's metadata and tensors, after checking them all.

    Checked: the metadata keys (``names``, ``shapes``, ``beta``, ``settings``) are JSON of the
    right types; names are unique strings, one ``(rows, cols)`` of positive ints each; one
    ``sens/<name>`` tensor per name and no other, of ``cols`` finite, non-negative floats, not
    all zero; every estimator's ``beta`` has every name, finite (the Fisher estimator's also
    positive, the noise estimator's at least one positive).

    Raises:
        ValueError: ``{path}: <problem>; measure again with baq measure``.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: {why}; measure again with baq measure")

    parsed = {}
    for key in ("names", "shapes", "beta", "settings", "seconds"):
        if key not in meta and key != "seconds":
            raise bad(f"metadata '{key}' is missing")
        try:
            parsed[key] = json.loads(meta.get(key, "{}"))
        except ValueError:
            raise bad(f"metadata '{key}' is not JSON") from None
    names, shapes, beta = parsed["names"], parsed["shapes"], parsed["beta"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("'names' must be a non-empty list of layer names")
    if len(set(names)) != len(names):
        raise bad("'names' lists a layer twice")
    if not isinstance(shapes, list) or len(shapes) != len(names):
        raise bad(f"'shapes' must list one (rows, cols) per name ({len(names)})")
    for name, shape in zip(names, shapes):
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape)
        ):
            raise bad(f"layer {name}: shape {shape!r} is not two positive integers")
    extra = set(tensors) - {f"sens/{n}" for n in names}
    if extra:
        raise bad(f"unexpected tensor {sorted(extra)[0]}")
    sens = {}
    for name, (_, cols) in zip(names, shapes):
        t = tensors.get(f"sens/{name}")
        if t is None:
            raise bad(f"no sensitivities for layer {name}")
        if not t.is_floating_point() or tuple(t.shape) != (cols,):
            raise bad(f"layer {name}: sensitivities {tuple(t.shape)} {t.dtype}, expected ({cols},)")
        t = t.double()
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise bad(f"layer {name}: NaN, infinite or negative sensitivities")
        if not bool((t > 0).any()):
            raise bad(f"layer {name}: every sensitivity is zero")
        sens[name] = t
    if not isinstance(beta, dict):
        raise bad("'beta' must map estimators to layer importances")
    for est, values in beta.items():
        if est not in IMPORTANCES:
            raise bad(f"importance estimator {est!r}: {' or '.join(IMPORTANCES)}")
        if not isinstance(values, dict) or set(values) != set(names):
            raise bad(f"{est} importances must name exactly the measured layers")
        # the noise estimator's KL difference may come out <= 0 for a layer it found no effect
        # for (the allocation floors it); the Fisher estimator's is a mean square
        low = -math.inf if est == "noise" else 0.0
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v < math.inf:
                what = "finite" if est == "noise" else "finite and positive"
                raise bad(f"{est} importance of {name} is {v!r}: it must be {what}")
        if not any(v > 0 for v in values.values()):
            raise bad(f"no {est} importance is positive")
    if not isinstance(parsed["settings"], dict) or not isinstance(parsed["seconds"], dict):
        raise bad("'settings' and 'seconds' must be JSON objects")
    return Measurement(
        names=names,
        shapes=[tuple(s) for s in shapes],
        sens=sens,
        beta=beta,
        settings=parsed["settings"],
        seconds=parsed["seconds"],
    )


def settings_of(model_digest: str, calib_ids: Tensor, cfg: QuantConfig) -> dict[str, Any]:
    """What a measurement depends on: the weights, the calibration windows, some settings."""
    return {"model": model_digest, "calib": windows_digest(calib_ids)} | config_settings(cfg)


def depends_on_bits(settings: dict[str, Any]) -> bool:
    """Whether a measurement with these :func:`settings_of` depends on its budget: measured
    sensitivities come from a solve at ``round(2^B)`` levels, and the grids of clipped ranges and
    of AdaDim's choice are fitted at those levels too; analytic ones on min/max per-OC or per-IC
    grids serve every budget."""
    return (
        settings.get("sensitivity") == "measured"
        or bool(settings.get("clip", MEASURED_LATER["clip"]))
        or settings.get("dim") == "auto"
    )


def config_settings(cfg: QuantConfig) -> dict[str, Any]:
    """The part of :func:`settings_of` that ``cfg`` alone gives: :data:`MEASURED_FIELDS`, those
    of :data:`MEASURED_LATER` not at their default, and ``bits``."""
    out = {k: getattr(cfg, k) for k in MEASURED_FIELDS}
    out |= {k: getattr(cfg, k) for k, d in MEASURED_LATER.items() if getattr(cfg, k) != d}
    if not cfg.rotate:
        out.pop("rotate_seed", None)
    out["skip"] = list(cfg.skip)
    out["bits"] = cfg.bits  # used by measured sensitivities only
    return out


def measure_model(
    model: nn.Module,
    calib_ids: Tensor,
    cfg: QuantConfig,
    estimators: tuple[str, ...] = ("fisher",),
    device: torch.device | str | None = None,
    model_digest: str = "",
    progress: bool | None = None,
    batch_tokens: int = BATCH_TOKENS,
    max_activation_bytes: int | None = None,
    on_stage: Callable[[Measurement], None] | None = None,
    loader: LazyLoader | None = None,
) -> Measurement:
    """Measure sensitivities and importances of every quantizable linear of the float model.

    Args:
        model: the float causal LM (not modified).
        calib_ids: (nsamples, seqlen) calibration windows; the Hessians read the first
            ``cfg.measure_samples`` (all with None), the importance estimators the first
            ``cfg.importance_samples`` (the noise estimator at most
            ``importance.NOISE_WINDOWS``).
        cfg: sensitivity kind, grid and Hessian settings, ``skip`` patterns.
        estimators: which ``beta`` estimators to run.
        device: where blocks run (default: CUDA when present).
        model_digest: hash of the weights, recorded in the settings.
        progress: progress bars (None: on a terminal).
        batch_tokens, max_activation_bytes: as in :func:`baq.run.quantization.quantize_model`.
        on_stage: called with the measurement so far after each estimator (to save it, so an
            interrupted measurement of several estimators keeps the finished ones).
        loader: the :class:`baq.model.lazy.LazyLoader` of a lazily opened model: every pass then
            holds one block at a time (the Fisher estimator's backward too); the noise
            estimator, which runs the blocks after each layer, needs the whole model and is
            refused.
    Returns:
        The :class:`Measurement`.
    """
    from baq.model import loader as models

    device = models.resolve_device("auto" if device is None else str(device))
    if loader is not None and "noise" in estimators:
        raise ValueError(NOISE_NEEDS_WHOLE_MODEL)
    meas = Measurement([], [], {}, settings=settings_of(model_digest, calib_ids, cfg))
    t = time.perf_counter()
    _sensitivities(
        model,
        calib_ids[: cfg.measure_samples],
        cfg,
        device,
        meas,
        progress,
        batch_tokens,
        max_activation_bytes,
        loader,
    )
    meas.seconds["sensitivity"] = time.perf_counter() - t
    targets = dict(zip(meas.names, _modules(model, meas.names)))
    windows = calib_ids[: cfg.importance_samples]
    home = next(model.parameters()).device
    if loader is not None:
        loader.to(device)  # the resident part; blocks are loaded one at a time
        home = torch.device("cpu")
    else:
        model.to(device)
    try:
        for est in estimators:
            t = time.perf_counter()
            if est == "fisher":
                meas.beta[est] = importance.fisher_importance(
                    model, windows, targets, device, progress=progress, loader=loader
                )
            elif est == "noise":
                meas.beta[est] = importance.noise_importance(
                    model, windows[: importance.NOISE_WINDOWS], targets, device, progress=progress
                )
            else:
                raise ValueError(f"importance estimator {est!r}: use fisher or noise")
            meas.seconds[est] = time.perf_counter() - t
            if on_stage is not None:
                on_stage(meas)
            log.info("%s importances of %d layers in %.1f s", est, len(targets), meas.seconds[est])
    finally:
        if loader is not None:
            loader.to(home)
        else:
            model.to(home)
    return meas


def _modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    mods = dict(model.named_modules())
    return [mods[n] for n in names]


def _sensitivities(
    model: nn.Module,
    calib_ids: Tensor,
    cfg: QuantConfig,
    device: torch.device,
    meas: Measurement,
    progress: bool | None,
    batch_tokens: int,
    max_activation_bytes: int | None,
    loader: LazyLoader | None = None,
) -> None:
    """One pass over the float blocks: each block's Hessians and its outputs in one forward."""
    hdtype = torch.float64 if cfg.hessian_dtype == "float64" else torch.float32
    head_target = head.head_target(model) if cfg.include_head else {}
    walk = BlockWalk(
        model,
        calib_ids,
        device,
        "measure",
        cfg.skip,
        loader,
        max_activation_bytes,
        batch_tokens=batch_tokens,
        keep_last=bool(head_target),
        progress=progress,
    )
    with walk:
        for step in walk:
            dims = {}
            if cfg.dim == "auto" and cfg.adadim == "block":  # on the float block's outputs
                dims = adadim_block.choose_dims(
                    step.block, step.targets, step.inputs, step.kwargs, device, cfg
                )
            # the float block is not changed: its Hessian forward gives the next inputs too
            hessians = step.hessians(hdtype, keep_outputs=True)
            for name, mod in step.targets.items():
                _add_layer(
                    meas, f"{step.prefix}{name}", mod, hessians.pop(name), cfg, dims.get(name)
                )
        # the head reads the final norm of the last block's float outputs (baq.run.head)
        for name, mod in head_target.items():
            H = head.head_hessian(model, walk.inputs, device, walk.batch, hdtype)
            _add_layer(meas, name, mod, H, cfg)


def _add_layer(
    meas: Measurement,
    name: str,
    mod: nn.Module,
    H: Tensor,
    cfg: QuantConfig,
    chosen_dim: str | None = None,
) -> None:
    """Sensitivities ``c_j`` of one float linear on its Hessian, recorded in ``meas``; with
    ``--dim auto`` on the grid of ``chosen_dim`` (the block output criterion's) or, without
    one, of the proxy criterion's choice; with ``--rotate`` those of the rotated layer
    ``(W R^T, R H R^T)`` that the quantization pass solves (the plan's levels are the rotated
    columns')."""
    W = blocks.get_weight(mod)
    check_finite(name, W)  # before the importance pass, which NaN weights would derail
    shape = tuple(W.shape)
    W, H = rotated_layer(W, H, layer_rotation(cfg, name, shape[1]))
    factor = factor_hessian(H, cfg.percdamp, False)
    Wd = W.to(factor.U.device, torch.float32).clone()
    Wd[:, factor.dead] = 0
    dim = grid_dim(Wd, H, cfg, None, chosen_dim)  # AdaDim's at the uniform budget, on the float H
    grid = layer_grid(Wd, H, cfg, dim)
    sens, _ = column_sensitivity(Wd, factor, grid, cfg)
    meas.names.append(name)
    meas.shapes.append(shape)
    meas.sens[name] = sens.double().cpu()

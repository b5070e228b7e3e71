"""One linear layer, one method: RTN, GPTQ or BAQ (DESIGN.md section 1, "BAQ algorithm").

BAQ per layer, on one factorised Hessian:

1. GPTQ at a uniform ``B`` bits measures the per-column losses ``l_j`` (skipped with analytic
   sensitivities, which need only the grid ranges and ``U``);
2. sensitivities ``c_j ∝ l_j``; level counts from the closed form with the budget met exactly
   (:mod:`baq.quant.allocate`);
3. GPTQ again with the allocated level counts.

Both solves share ``H``'s factorisation: the extra cost is one solve, no pass over the data.

With ``cfg.rotate`` (incoherence processing, QuIP/QuIP#; :mod:`baq.quant.rotation`) every step
above runs on ``W' = W R^T`` and ``H' = R H R^T`` for the layer's seeded randomized Hadamard
transform ``R``: the grid, clipping, AdaDim's choice, the sensitivities and the solve all see
the rotated layer, whose proxy loss is the original one's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..config import QuantConfig
from . import adadim, allocate
from .clip import clip_grid
from .gptq import HessianFactor, QuantResult, factor_hessian, gptq_solve, rtn_solve
from .grid import Grid, expand_rows, fit_grid, group_of, nominal_bits, uniform_levels
from .rotation import HadamardRotation, layer_seed, original_basis, rotate_input, supported


@dataclass
class LayerRecord:
    """What happened to one layer; ``report.py`` writes it as JSON."""

    name: str
    shape: tuple[int, int]
    method: str
    nominal_bits: float
    loss: float  # sum_j l_j of the final solve (0 for RTN)
    uniform_loss: float | None = None  # sum_j l_j of the uniform solve at B bits (BAQ, measured)
    predicted_gain: float | None = None  # geomean(c) / mean(c)
    modelled_gain: float | None = None  # modelled loss at the allocated levels / uniform
    percdamp: float | None = None
    dim: str = "oc"  # grid dimension: "oc" per row, "ic" per column (AdaDim's choice with auto)
    seconds: float = 0.0
    level_histogram: dict[int, int] = field(default_factory=dict)
    beta: float | None = None  # model-level allocation: importance of one unit of its loss
    modelled_loss: float | None = None  # model-level allocation: sum_j c_j / L_j^2 planned
    rotated: bool = False  # quantized in the basis of its input-side rotation (cfg.rotate)

    @property
    def loss_ratio(self) -> float | None:
        """Measured BAQ / uniform-GPTQ loss, to set against ``predicted_gain``."""
        if self.uniform_loss is None or self.uniform_loss <= 0:
            return None
        return self.loss / self.uniform_loss


def level_histogram(levels: Tensor) -> dict[int, int]:
    values, counts = torch.unique(levels.cpu(), return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


def uniform_probe_levels(bits: float) -> int:
    """Level count of BAQ's uniform measuring solve: ``round(2^B)``, at least 2."""
    return max(2, int(round(2.0**bits)))


def adadim_probe_levels(
    cols: int, cfg: QuantConfig, levels: Tensor | None, device: torch.device | str
) -> Tensor:
    """The level counts AdaDim compares the two grids at: the planned ones (model level), the
    uniform integer bitwidth (GPTQ), or BAQ's uniform measuring solve's ``round(2^B)``."""
    if levels is not None:
        return levels.to(device)
    if cfg.method == "gptq":
        return uniform_levels(cols, int(cfg.bits), device)
    return torch.full((cols,), uniform_probe_levels(cfg.bits), device=device)


def grid_kwargs(cfg: QuantConfig) -> dict:
    """The grid settings :mod:`.adadim` compares, from ``cfg``."""
    return dict(group_size=cfg.group_size, sym=cfg.sym, range_dtype=cfg.range_dtype)


def grid_dim(
    Wd: Tensor,
    H: Tensor,
    cfg: QuantConfig,
    levels: Tensor | None = None,
    chosen_dim: str | None = None,
) -> str:
    """The grid dimension of one layer: ``cfg.dim``, or with ``auto`` the one AdaDim chose
    outside (``chosen_dim``: the block output criterion, ``baq.run.adadim_block``), else the one
    with the smaller RTN proxy error on ``H`` at :func:`adadim_probe_levels`.

    Args:
        Wd: (rows, cols) float32 weights with dead columns zeroed.
        H: (cols, cols) Hessian; levels: planned level counts (model level) or None.
    """
    if cfg.dim != "auto":
        return cfg.dim
    if chosen_dim is not None:
        return chosen_dim
    probe = adadim_probe_levels(Wd.shape[1], cfg, levels, Wd.device)
    return adadim.choose_dim(Wd, H, probe, **grid_kwargs(cfg))[0]


def layer_grid(
    Wd: Tensor, H: Tensor | None, cfg: QuantConfig, dim: str, levels: Tensor | None = None
) -> Grid:
    """The grid one layer is quantized on: min/max ranges (:func:`fit_grid`), per-OC ones
    clipped with ``cfg.clip`` (:func:`~baq.quant.clip.clip_grid`, weighted by ``diag H``, at
    :func:`adadim_probe_levels`: the planned levels, GPTQ's or BAQ's uniform probe).

    Args:
        Wd: (rows, cols) float32 weights with dead columns zeroed.
        H: the layer's Hessian, or None (RTN: unweighted clipping).
        cfg: the settings; dim: the layer's grid dimension (:func:`grid_dim`).
        levels: planned level counts (model level) or None.
    """
    grid = fit_grid(Wd, cfg.group_size, cfg.sym, cfg.range_dtype, dim)
    if cfg.clip and dim == "oc":
        probe = adadim_probe_levels(Wd.shape[1], cfg, levels, Wd.device)
        weight = None if H is None else torch.diagonal(H).to(Wd.device, torch.float32)
        grid, _ = clip_grid(Wd, grid, probe, weight, cfg.range_dtype)
    return grid


def layer_rotation(cfg: QuantConfig, name: str, cols: int) -> HadamardRotation | None:
    """The input-side rotation of layer ``name`` (seed :func:`layer_seed` of ``cfg.rotate_seed``
    and the name), or None: without ``cfg.rotate``, or for a width with no fast construction
    (:data:`~baq.quant.rotation.SUPPORTED`; such a layer is quantized unrotated)."""
    if not cfg.rotate or not supported(cols):
        return None
    return HadamardRotation(cols, layer_seed(cfg.rotate_seed, name))


def rotated_layer(
    W: Tensor, H: Tensor | None, rot: HadamardRotation | None
) -> tuple[Tensor, Tensor | None]:
    """``(W R^T, R H R^T)`` (:func:`~baq.quant.rotation.rotate_input`), or ``(W, H)`` with no
    rotation. ``W'`` is rotated in float64 and returned in float32 (a half-precision weight
    would otherwise be rounded again in the new basis); ``H'`` keeps ``H``'s dtype."""
    if rot is None:
        return W, H
    Wr, Hr = rotate_input(W.double(), H, rot)
    return Wr.float(), Hr


def quantize_layer(
    W: Tensor,
    H: Tensor | None,
    cfg: QuantConfig,
    name: str = "",
    levels: Tensor | None = None,
    chosen_dim: str | None = None,
) -> tuple[QuantResult, LayerRecord]:
    """Quantize one weight matrix with ``cfg.method``; with ``cfg.rotate`` in the basis of the
    layer's rotation (:func:`layer_rotation`): the result's codes, grid, levels and losses are
    then those of ``W R^T`` on ``R H R^T``, its ``weight`` the dequantized one taken back to
    the original basis (:func:`~baq.quant.rotation.original_basis`), its ``rotation`` the seed.

    Args and returns: as :func:`quantize_basis`; ``name`` also seeds the rotation.
    """
    rot = layer_rotation(cfg, name, W.shape[1])
    if rot is None:
        return quantize_basis(W, H, cfg, name, levels, chosen_dim)
    Wr, Hr = rotated_layer(W, H, rot)
    res, rec = quantize_basis(Wr, Hr, cfg, name, levels, chosen_dim)
    rec.rotated = True
    return replace(res, weight=original_basis(res.weight, rot.seed), rotation=rot.seed), rec


def quantize_basis(
    W: Tensor,
    H: Tensor | None,
    cfg: QuantConfig,
    name: str = "",
    levels: Tensor | None = None,
    chosen_dim: str | None = None,
) -> tuple[QuantResult, LayerRecord]:
    """Quantize one weight matrix with ``cfg.method``, in the basis it is given in.

    Args:
        W: (rows, cols) weights in (out_features, in_features) layout, any float dtype.
        H: (cols, cols) Hessian proxy ``2 X X^T / n`` (float32 or float64); unused by RTN.
        cfg: the settings.
        name: layer name for the record.
        levels: (cols,) planned level counts (BAQ with the model-level allocation, planned
            before any layer was quantized): one GPTQ solve with them, no allocation here.
        chosen_dim: with ``cfg.dim == "auto"``, the dimension AdaDim chose outside (the block
            output criterion, ``baq.run.adadim_block``); None: the proxy error on ``H`` chooses.
    Returns:
        The result (original column order) and its :class:`LayerRecord`.
    """
    rows, cols = W.shape
    if cfg.method == "rtn":
        levels = uniform_levels(cols, int(cfg.bits), W.device)
        grid = layer_grid(W.float(), None, cfg, cfg.dim) if cfg.clip else None
        res = rtn_solve(W, levels, cfg.group_size, cfg.sym, cfg.range_dtype, cfg.dim, grid)
        return res, _record(name, cfg, res)

    assert H is not None, "GPTQ and BAQ need the layer's Hessian"
    factor = factor_hessian(H, cfg.percdamp, cfg.act_order)
    Wd = W.to(factor.U.device, torch.float32).clone()
    Wd[:, factor.dead] = 0
    dim = grid_dim(Wd, H, cfg, levels, chosen_dim)
    # per-IC: the float weights' ranges (the analytic sensitivity's); the solve refits them
    grid = layer_grid(Wd, H, cfg, dim, levels)
    solve = solve_args(grid, cfg)
    if cfg.method == "gptq":
        res = gptq_solve(Wd, factor, uniform_levels(cols, int(cfg.bits), Wd.device), **solve)
        return res, _record(name, cfg, res, percdamp=factor.percdamp)
    if levels is not None:
        res = gptq_solve(Wd, factor, levels.to(Wd.device), **solve)
        return res, _record(name, cfg, res, percdamp=factor.percdamp)

    sens, uniform = column_sensitivity(Wd, factor, grid, cfg)
    if cfg.integer_bits:
        max_bits = int(math.floor(math.log2(cfg.max_levels)))
        min_bits = math.ceil(math.log2(cfg.min_levels))
        levels = allocate.allocate_integer_bits(sens, cfg.bits, max_bits, min_bits)
    else:
        levels = allocate.allocate_levels(
            sens, cfg.bits, cfg.exponent, cfg.max_levels, cfg.min_levels
        )
    res = gptq_solve(Wd, factor, levels.to(Wd.device), **solve)
    uniform_levels_ = torch.full_like(levels, uniform_probe_levels(cfg.bits))
    rec = _record(
        name,
        cfg,
        res,
        percdamp=factor.percdamp,
        uniform_loss=None if uniform is None else uniform.loss,
        predicted_gain=allocate.predicted_gain(sens),
        modelled_gain=allocate.modelled_loss(sens, levels)
        / max(allocate.modelled_loss(sens, uniform_levels_), 1e-300),
    )
    return res, rec


def column_sensitivity(
    Wd: Tensor, factor: HessianFactor, grid: Grid, cfg: QuantConfig
) -> tuple[Tensor, QuantResult | None]:
    """BAQ's per-column sensitivities ``c_j`` (step 2) on a factorised Hessian.

    Measured: ``c_j = l_j 2^(2B)`` from a uniform GPTQ solve at ``round(2^B)`` levels (the solve
    is returned too); analytic: ``c_j = sum_r range_r^2 / (12 U_jj^2)``, no solve (None).
    With a per-IC grid the analytic form is ``sum_groups rows_g range_gj^2 / (12 U_jj^2)`` with
    the column's own ranges: those of the float weights (``grid``), since the solve fits each
    column's ranges to its values after the earlier columns' feedback, which depend on the
    levels being chosen here; the measured solve refits them as the final solve does.

    Args:
        Wd: (rows, cols) float32 weights with dead columns zeroed.
        factor: :func:`factor_hessian` of the layer's ``H``.
        grid: the grid fitted on ``Wd`` (per-OC or per-IC).
        cfg: ``sensitivity``, ``bits``, ``block_size``.
    Returns:
        ``((cols,) float64 c_j, the uniform solve or None)``.
    """
    cols = Wd.shape[1]
    if cfg.sensitivity == "measured":
        probe = torch.full((cols,), uniform_probe_levels(cfg.bits), dtype=torch.int64)
        uniform = gptq_solve(Wd, factor, probe.to(Wd.device), **solve_args(grid, cfg))
        return allocate.uniform_sensitivity(uniform.losses, math.log2(probe[0].item())), uniform
    if grid.dim == "ic":
        ranges = expand_rows(grid, grid.hi - grid.lo, Wd.shape[0]).expand(Wd.shape[0], -1)
    else:
        cols_idx = torch.arange(cols, device=grid.lo.device)
        ranges = (grid.hi - grid.lo)[:, group_of(cols_idx, grid.group_size)]
    Udiag = torch.empty(cols, dtype=torch.float32, device=factor.U.device)
    Udiag[factor.perm] = torch.diagonal(factor.U)
    sens = allocate.analytic_sensitivity(ranges, Udiag)
    sens[factor.dead.to(sens.device)] = 0
    return sens, None


def solve_args(grid: Grid, cfg: QuantConfig) -> dict:
    """Keyword arguments of :func:`gptq_solve` for ``grid``: the grid itself (per-OC), or the
    settings of the per-IC ranges that the solve fits column by column."""
    if grid.dim == "ic":
        return dict(
            dim="ic",
            group_size=cfg.group_size,
            sym=cfg.sym,
            range_dtype=cfg.range_dtype,
            block_size=cfg.block_size,
        )
    return dict(grid=grid, block_size=cfg.block_size)


def _record(name: str, cfg: QuantConfig, res: QuantResult, **extra) -> LayerRecord:
    return LayerRecord(
        name=name,
        shape=tuple(res.weight.shape),
        method=cfg.method,
        dim=res.grid.dim,
        nominal_bits=nominal_bits(res.levels),
        loss=res.loss,
        level_histogram=level_histogram(res.levels),
        **extra,
    )

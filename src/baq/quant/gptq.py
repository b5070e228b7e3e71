"""The GPTQ core with a level count per column (DESIGN.md section 1, "GPTQ core").

GPTQ (Frantar et al., 2023) quantizes the columns of ``W`` in order and lets the columns not yet
quantized absorb each rounding error through the upper Cholesky factor ``U`` of ``H^-1``:

    e_j = (w_j - q_j) / U_jj,      W[:, j+1:] -= e_j U[j, j+1:]                      (GPTQ eq. 3)

with lazy batch updates: inside a block of ``block_size`` columns the update is applied column by
column, to the rest of the matrix once per block. The per-column loss

    l_j = sum_rows (w_j - q_j)^2 / U_jj^2 / 2 = ||e_j||^2 / 2

is the share of the layer-output error caused by column ``j``; BAQ (Zhang et al., 2025) uses it as
the sensitivity of that column.

With a per-IC grid (``dim="ic"``, Heo et al., ICLR 2024) the range(s) of column ``j`` are fitted
when the solver reaches it, from its values after the earlier columns' error feedback, as in the
paper's code: activation order then needs no static groups, and the stored ranges are the ones
the codes were rounded against.

The Hessian is factorised once (:func:`factor_hessian`) and can serve several solves, which is what
makes BAQ cost one extra solve per layer rather than an extra pass over the calibration data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import Grid, column_params, fit_grid, quantize

log = logging.getLogger(__name__)


class HessianError(ValueError):
    """The Hessian stays singular even with the largest dampening tried."""


@dataclass(frozen=True)
class HessianFactor:
    """What the solver needs from ``H``, computed once per layer.

    Attributes:
        U: (cols, cols) float32 upper Cholesky factor of the dampened ``H^-1``, rows and columns in
            processing order (``perm``).
        perm: (cols,) processing order (identity unless act-order).
        dead: (cols,) bool, inputs that never fired (``H_jj == 0``); their weights are zeroed.
        percdamp: dampening actually used, as a fraction of mean(diag H).
    """

    U: Tensor
    perm: Tensor
    dead: Tensor
    percdamp: float


@dataclass(frozen=True)
class QuantResult:
    """One solved layer, all in the original column order.

    Attributes:
        weight: (rows, cols) float32 dequantized weights.
        codes: (rows, cols) int64 codes, column j in [0, levels[j] - 1].
        grid: the ranges the codes refer to.
        levels: (cols,) int64 level counts.
        losses: (cols,) float32 per-column losses l_j (zero for RTN, which has no ``H``).
        rotation: the seed of the input-side :class:`~baq.quant.rotation.HadamardRotation`
            the layer was quantized in, or None: codes, grid, levels and losses are then in the
            rotated basis, ``weight`` in the original one (``rotation.original_basis``).
    """

    weight: Tensor
    codes: Tensor
    grid: Grid
    levels: Tensor
    losses: Tensor
    rotation: int | None = None

    @property
    def loss(self) -> float:
        return float(self.losses.double().sum())


def factor_hessian(
    H: Tensor, percdamp: float = 0.01, act_order: bool = False, max_tries: int = 6
) -> HessianFactor:
    """Dampen, (optionally) reorder and factorise ``H`` into the upper Cholesky factor of ``H^-1``.

    Dead inputs get ``H_jj = 1`` (their weights are zeroed by the solver). If the Cholesky
    factorisation fails, the dampening is multiplied by 10 and retried, with a warning each time.

    Memory: besides the caller's ``H``, one ``(cols, cols)`` matrix of the working dtype (the
    reordered, dampened copy, factorised, inverted and factorised again in place on the CPU),
    plus a float32 ``U`` when working in float64 (:func:`baq.run.solve_memory.solve_bytes`).

    Args:
        H: (cols, cols) Hessian proxy ``2 X X^T / n``; solved in float32, or float64 if given so.
        percdamp: dampening as a fraction of mean(diag H).
        act_order: process columns by decreasing ``diag H`` (GPTQ's activation order).
        max_tries: dampening levels tried before giving up.
    Returns:
        The :class:`HessianFactor` (``U`` in float32).
    Raises:
        HessianError: when every dampening level fails (e.g. NaN or Inf in ``H``).
    """
    work_dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    if not _all_finite(H):
        raise HessianError("Hessian contains NaN or Inf: check the calibration inputs")
    cols = H.shape[0]
    dead = torch.diagonal(H) == 0
    perm = None
    if act_order:  # dead columns count as H_jj = 1, as they are solved
        diag = torch.diagonal(H).to(work_dtype).masked_fill(dead, 1.0)
        perm = torch.argsort(diag, descending=True, stable=True)
    damp = percdamp
    for attempt in range(max_tries):
        A = _working_copy(H, perm, dead, work_dtype)
        if attempt == 0:
            mean_diag = float(torch.diagonal(A).mean())
        A.diagonal().add_(damp * mean_diag)
        U = _inverse_factor(A)
        del A  # on the CPU, U is A
        if U is not None:
            if perm is None:
                perm = torch.arange(cols, device=H.device)
            return HessianFactor(U=U.float(), perm=perm, dead=dead, percdamp=damp)
        if attempt + 1 < max_tries:
            log.warning(
                "Hessian not positive definite with percdamp=%g; retrying with %g", damp, damp * 10
            )
            damp *= 10
    raise HessianError(
        f"Hessian not positive definite even with percdamp={damp:g}: "
        "use more calibration samples or a larger --percdamp"
    )


# columns of H gathered at once by the reordering (bounds its temporaries to a few MB)
_GATHER_COLS = 256


def _working_copy(H: Tensor, perm: Tensor | None, dead: Tensor, dtype: torch.dtype) -> Tensor:
    """``H[perm][:, perm]`` in ``dtype`` with ``H_jj = 1`` at dead inputs: one new matrix.

    Column-major (LAPACK's layout), so the factorisations below run in place without copies;
    the reordering is gathered a few columns at a time instead of through two full copies.
    """
    cols = H.shape[0]
    A = torch.empty((cols, cols), dtype=dtype, device=H.device).mT  # column-major
    if perm is None:
        A.copy_(H)
    else:
        perm = perm.to(H.device)
        for i in range(0, cols, _GATHER_COLS):
            A[:, i : i + _GATHER_COLS] = H.index_select(1, perm[i : i + _GATHER_COLS])[perm]
        dead = dead[perm]
    A.diagonal()[dead] = 1.0
    return A


def _inverse_factor(A: Tensor) -> Tensor | None:
    """The upper Cholesky factor ``U`` of ``A^-1`` (GPTQ's ``Cholesky(H^-1)``), or None when
    ``A`` (or ``A^-1``, in rounding) is not positive definite.

    On the CPU every step overwrites ``A`` (``out=A``: bitwise what the out-of-place calls
    give, tested), so the factor costs no matrix beyond ``A``; elsewhere (CUDA, where torch
    copies such outputs) ``L`` and ``H^-1`` are freed as soon as the next step exists.
    """
    if A.device.type == "cpu":
        info = torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(A, out=(A, info))  # A = L, lower
        if int(info) != 0:
            return None
        torch.cholesky_inverse(A, out=A)  # A = H^-1
        torch.linalg.cholesky_ex(A, upper=True, out=(A, info))  # A = U
        U = A
    else:
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            return None
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
    if int(info) != 0 or not _all_finite(U):
        return None
    return U


def _all_finite(T: Tensor) -> bool:
    """``torch.isfinite(T).all()`` a few columns at a time: on a whole matrix it allocates
    about two matrices of temporaries (``abs``, comparisons)."""
    return all(
        bool(torch.isfinite(T[:, i : i + _GATHER_COLS]).all())
        for i in range(0, T.shape[1], _GATHER_COLS)
    )


def gptq_solve(
    W: Tensor,
    factor: HessianFactor,
    levels: Tensor,
    grid: Grid | None = None,
    block_size: int = 128,
    group_size: int | None = None,
    sym: bool = False,
    dim: str = "oc",
    range_dtype: str = "float16",
) -> QuantResult:
    """Quantize ``W`` column by column with GPTQ error feedback and per-column level counts.

    Args:
        W: (rows, cols) weights, any float dtype (the solve runs in float32).
        factor: from :func:`factor_hessian` on this layer's ``H``.
        levels: (cols,) int level counts L_j >= 1, in the original column order.
        grid: ranges to quantize against; default: fitted to ``W`` (dead columns zeroed) with
            ``group_size`` and ``sym``. Groups are fixed on the original column indices and their
            ranges are taken before any error feedback ("static groups"), so act-order and groups
            combine without reordering the stored ranges.
        block_size: lazy-batch block (the result does not depend on it, up to rounding).
        group_size, sym: of the grid fitted here (``grid`` None).
        dim: "oc": one fixed grid as above; "ic": per-IC ranges (``group_size`` rows per range,
            or the whole column) fitted to each column when it is reached; ``grid`` must be None.
        range_dtype: of the per-IC ranges ("float16" or "float32", as :func:`fit_grid`).
    Returns:
        The :class:`QuantResult`, in the original column order.
    """
    rows, cols = W.shape
    device = factor.U.device
    W = W.to(device=device, dtype=torch.float32)
    if bool(factor.dead.any()):  # a copy only when there is something to zero
        W = W.clone()
        W[:, factor.dead] = 0
    if dim not in ("oc", "ic"):
        raise ValueError(f"dim={dim!r}: use oc or ic")
    if dim == "ic" and grid is not None:
        raise ValueError("per-IC ranges are fitted during the solve: pass grid=None")
    perm = factor.perm
    levels = levels.to(device=device, dtype=torch.int64)
    lv = levels[perm]
    if dim == "ic":
        block_params, grid_of = _ic_ranges(rows, lv, group_size, sym, range_dtype)
    else:
        if grid is None:
            grid = fit_grid(W, group_size=group_size, sym=sym)

        def block_params(i1: int, i2: int):
            step, zero = column_params(grid, lv[i1:i2], perm[i1:i2])  # (rows, b)
            step, zero = step.t().contiguous(), zero.t().contiguous()  # (b, rows)
            return lambda i, w: (step[i], zero[i])

        def grid_of(inv: Tensor) -> Grid:
            return grid

    Qt, Ct, losses = _blocked_solve(W, factor, lv, block_size, block_params)
    del W
    inv = torch.argsort(perm)
    # (rows, cols) in the original order, gathered straight from the transposed layout: one
    # copy each, and the solver's buffer freed before the next is made
    weight = Qt.t()[:, inv]
    del Qt
    codes = Ct.t()[:, inv]
    del Ct
    return QuantResult(
        weight=weight,
        codes=codes.long(),
        grid=grid_of(inv),
        levels=levels,
        losses=losses[inv],
    )


def _blocked_solve(
    W: Tensor, factor: HessianFactor, lv: Tensor, block_size: int, block_params
) -> tuple[Tensor, Tensor, Tensor]:
    """The lazy-batch GPTQ loop, in processing order.

    Args:
        W: (rows, cols) float32, dead columns zeroed; lv: (cols,) levels in processing order.
        block_params: ``(i1, i2) -> params``, called once per block; ``params(i, w)`` gives the
            step and zero point (broadcastable to (rows,)) of the block's column ``i`` from its
            current values ``w``, i.e. after the earlier columns' error feedback.
    Returns:
        (cols, rows) dequantized weights and codes, and the (cols,) losses, processing order.
    """
    cols = W.shape[1]
    U = factor.U
    # transposed layout: a column of W is a contiguous row of Wt, and so are the updates
    Wt = W.t()[factor.perm]  # (cols, rows), processing order: one gathered copy
    Qt = torch.empty_like(Wt)
    Ct = torch.empty_like(Wt)
    losses = torch.empty(cols, dtype=torch.float32, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2]  # (b, rows) view, updated in place
        U1 = U[i1:i2, i1:i2]
        params = block_params(i1, i2)
        maxq = (lv[i1:i2] - 1).clamp(min=0).float()
        E1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            w = W1[i]
            step, zero = params(i, w)
            q = torch.clamp(torch.round(w / step) + zero, 0, maxq[i])
            Ct[i1 + i] = q
            deq = (q - zero) * step
            Qt[i1 + i] = deq
            err = (w - deq) / U1[i, i]
            E1[i] = err
            # columns i+1.. of this block absorb the error now, the rest once per block
            W1[i + 1 :] -= U1[i, i + 1 :].unsqueeze(1) * err.unsqueeze(0)
        losses[i1:i2] = E1.square().sum(dim=1) / 2
        if i2 < cols:  # in place: `-= U.t() @ E1` made a (cols - i2, rows) temporary per block,
            # fresh pages each time (a 28672 x 8192 layer zero-filled 105 GB of them)
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)
    return Qt, Ct, losses


def _ic_ranges(rows: int, lv: Tensor, group_size: int | None, sym: bool, range_dtype: str):
    """Per-IC ranges fitted to each column as the solver reaches it (``block_params`` of
    :func:`_blocked_solve`), and ``grid_of(inv)``: the grid they make, in the original order.

    A column's ranges are ``fit_grid`` of the column alone, so they are exactly what
    :func:`fit_grid` with ``dim="ic"`` gives for its values after the earlier columns' feedback.
    """
    if group_size is not None and group_size >= rows:
        group_size = None  # one group holds the whole column: as fit_grid stores it
    ngroups = 1 if group_size is None else -(-rows // group_size)
    lo_t = torch.empty(lv.numel(), ngroups, dtype=torch.float32, device=lv.device)  # processing
    hi_t = torch.empty_like(lo_t)

    def block_params(i1: int, i2: int):
        def params(i: int, w: Tensor) -> tuple[Tensor, Tensor]:
            g = fit_grid(w.unsqueeze(1), group_size, sym, range_dtype, dim="ic")  # (G, 1)
            lo_t[i1 + i], hi_t[i1 + i] = g.lo[:, 0], g.hi[:, 0]
            step, zero = column_params(g, lv[i1 + i : i1 + i + 1], rows=rows)  # (rows or 1, 1)
            return step[:, 0], zero[:, 0]

        return params

    def grid_of(inv: Tensor) -> Grid:
        return Grid(lo_t[inv].t().contiguous(), hi_t[inv].t().contiguous(), group_size, sym, "ic")

    return block_params, grid_of


def rtn_solve(
    W: Tensor,
    levels: Tensor,
    group_size: int | None = None,
    sym: bool = False,
    range_dtype: str = "float16",
    dim: str = "oc",
    grid: Grid | None = None,
) -> QuantResult:
    """Round-to-nearest on the same grid, no error feedback (the baseline GPTQ improves on).

    ``dim="ic"``: per-IC ranges fitted to the weights at once (no feedback to wait for).
    ``grid``: ranges fitted outside (clipped ones); None: min/max ranges."""
    if grid is None:
        grid = fit_grid(W, group_size=group_size, sym=sym, range_dtype=range_dtype, dim=dim)
    codes, weight = quantize(W, grid, levels)
    zeros = torch.zeros(W.shape[1], dtype=torch.float32, device=W.device)
    return QuantResult(weight, codes, grid, levels.to(torch.int64), zeros)


def proxy_loss(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """Layer-output error proxy ``trace((W - Q) H (W - Q)^T)`` in float64 (GPTQ eq. 1 with H)."""
    D = (W.double() - Q.double()).to(H.device)
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))

"""AdaDim: per layer, the grid dimension (per-OC or per-IC) with the smaller error.

Heo et al., "Rethinking Channel Dimensions to Isolate Outliers for Low-bit Weight Quantization of
Large Language Models" (ICLR 2024), choose per layer between a per-output-channel grid (one range
per row) and a per-input-channel one (one range per column, or per group of rows of a column) by
the error of a round-to-nearest pass in each dimension. Their criterion is the block output on
calibration data; the one here is the layer's own output-error proxy on the same Hessian

    E_d = tr((W - Q_d) H (W - Q_d)^T),   Q_d = RTN of W on the dim-d grid       (GPTQ eq. 1)

which needs no extra pass over the data: ``H = 2 X X^T / n`` is already there for the solve, and
``E_d`` is ``2 / n`` times the squared error of the layer's output on the calibration inputs.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from .gptq import proxy_loss
from .grid import fit_grid, quantize

log = logging.getLogger(__name__)

DIMS: tuple[str, ...] = ("oc", "ic")


def rtn_errors(W: Tensor, H: Tensor, levels: Tensor, **grid: Any) -> dict[str, float]:
    """Proxy output error of RTN in each grid dimension.

    Args:
        W: (rows, cols) weights (dead columns zeroed, as the solver sees them).
        H: (cols, cols) Hessian proxy of the layer's inputs.
        levels: (cols,) level counts of the comparison (uniform: the layer's bits).
        grid: ``group_size``, ``sym``, ``range_dtype`` of the grids compared, as
            :func:`rtn_weights` takes them.
    Returns:
        ``{"oc": E_oc, "ic": E_ic}``.
    """
    return {dim: proxy_loss(W, rtn_weights(W, levels, dim, **grid), H) for dim in DIMS}


def rtn_weights(
    W: Tensor,
    levels: Tensor,
    dim: str,
    group_size: int | None = None,
    sym: bool = False,
    range_dtype: str = "float16",
) -> Tensor:
    """``W`` rounded to nearest on its own grid in dimension ``dim`` (dequantized, W's shape).

    Args:
        W, levels: as :func:`rtn_errors`.
        group_size, sym, range_dtype: of the grid (``group_size`` counts columns per range for
            ``oc``, rows per range for ``ic``, as :func:`fit_grid` takes it).
    """
    grid = fit_grid(W, group_size, sym, range_dtype, dim=dim)
    _, Q = quantize(W, grid, levels.to(W.device))
    return Q


def choose_dim(W: Tensor, H: Tensor, levels: Tensor, **grid: Any) -> tuple[str, dict[str, float]]:
    """AdaDim's choice for one layer: the dimension whose RTN proxy error is smaller (ties: oc).

    Args: as :func:`rtn_errors` (``group_size``, ``sym``, ``range_dtype`` by keyword).
    Returns:
        ``("oc" or "ic", {"oc": E_oc, "ic": E_ic})``.
    """
    errors = rtn_errors(W, H, levels, **grid)
    dim = "ic" if errors["ic"] < errors["oc"] else "oc"
    log.debug("AdaDim: oc %.4g, ic %.4g -> %s", errors["oc"], errors["ic"], dim)
    return dim, errors

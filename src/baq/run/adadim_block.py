"""AdaDim's own criterion: per linear, the block output error of a round-to-nearest pass.

Heo et al., "Rethinking Channel Dimensions to Isolate Outliers for Low-bit Weight Quantization of
Large Language Models" (ICLR 2024), choose per layer between a per-output-channel grid and a
per-input-channel one by what each does to the output of the decoder block on calibration data:
the layer alone is rounded to nearest on each grid, the rest of the block stays float, and the
dimension whose block output is closer to the float block's wins,

    d_l = argmin_d  sum_x || f_b(x; W_l -> RTN_d(W_l)) - f_b(x) ||^2

over the first :data:`BLOCK_WINDOWS` calibration windows ``x`` of the block's inputs. Unlike the
proxy criterion of :mod:`baq.quant.adadim` (``tr(dW H dW^T)`` of the layer alone) it sees what
the rest of the block makes of the layer's error (attention's softmax, the MLP's gate), at the
cost of two block forwards per linear over those windows.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from baq.config import QuantConfig
from baq.model import blocks
from baq.quant import adadim
from baq.quant.layer import adadim_probe_levels, grid_kwargs

log = logging.getLogger(__name__)

# calibration windows the block criterion reads: the block runs 1 + 2 x (linears) times on each
BLOCK_WINDOWS = 8


def block_output_errors(
    block: nn.Module,
    targets: dict[str, nn.Module],
    windows: Tensor,
    kwargs: dict,
    cfg: QuantConfig,
    levels: dict[str, Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Squared block-output error of RTN in each grid dimension, one linear at a time.

    Args:
        block: the decoder block, float weights, on the device of ``windows``.
        targets: name -> linear of ``block`` (the names of :func:`pipeline.block_targets`).
        windows: (n, seq, hidden) block inputs.
        kwargs: the block's keyword arguments (``blocks.capture_block_inputs``), on its device.
        cfg: grid settings and the budget the two grids are compared at.
        levels: name -> planned (cols,) level counts (model-level allocation); other layers
            compare at the uniform probe of :func:`quant.layer.adadim_probe_levels`.
    Returns:
        name -> ``{"oc": E_oc, "ic": E_ic}``; every weight of ``block`` is as it was.
    """
    ref = [blocks.run_block(block, x[None], kwargs).float() for x in windows]
    out: dict[str, dict[str, float]] = {}
    for name, mod in targets.items():
        W = blocks.get_weight(mod)
        Wf = W.float()
        probe = adadim_probe_levels(Wf.shape[1], cfg, (levels or {}).get(name), Wf.device)
        errors = {}
        try:
            for dim in adadim.DIMS:
                Q = adadim.rtn_weights(Wf, probe, dim, **grid_kwargs(cfg))
                blocks.set_weight(mod, Q)
                errors[dim] = sum(
                    float((blocks.run_block(block, x[None], kwargs).float() - r).pow(2).sum())
                    for x, r in zip(windows, ref)
                )
        finally:
            blocks.set_weight(mod, W)
        out[name] = errors
    return out


@torch.inference_mode()
def choose_dims(
    block: nn.Module,
    targets: dict[str, nn.Module],
    inputs: Tensor,
    kwargs: dict,
    device: torch.device,
    cfg: QuantConfig,
    levels: dict[str, Tensor] | None = None,
) -> dict[str, str]:
    """AdaDim's choice for every linear of one block by the block output criterion.

    Args:
        inputs: the block's calibration inputs (a tensor or an ``ActivationStore``): the first
            :data:`BLOCK_WINDOWS` are read.
        Others as :func:`block_output_errors`.
    Returns:
        name -> ``"oc"`` or ``"ic"`` (ties: oc, as :func:`quant.adadim.choose_dim`).
    """
    windows = inputs[: min(BLOCK_WINDOWS, len(inputs))].to(device)
    errors = block_output_errors(block, targets, windows, kwargs, cfg, levels)
    dims = {}
    for name, e in errors.items():
        dims[name] = "ic" if e["ic"] < e["oc"] else "oc"
        log.debug(
            "AdaDim (block output) %s: oc %.4g, ic %.4g -> %s", name, e["oc"], e["ic"], dims[name]
        )
    return dims

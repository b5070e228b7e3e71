"""The quantized linear module: packed codes in memory, dequantized in ``forward``.

Also the storage rate of a set of solver results, computed from their level counts alone, so a
run can report the size its save will have without writing it (docs/FORMAT.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packing import (
    PackedCodes,
    layer_nbytes,
    layer_tensors,
    pack_columns,
    range_dtype,
    unpack_sorted,
)
from .quant.gptq import QuantResult
from .quant.grid import Grid, column_params, dequantize_codes


class PackedLinear(nn.Module):
    """A linear layer that keeps its weight packed and dequantizes it in ``forward``.

    Buffers only: ``level_classes`` (K, 2) int32, ``perm`` (cols,) int16/int32 or None,
    ``codes_<L>`` one packed stream per level class, ``lo_bits``/``hi_bits`` (rows, ngroups) the
    ranges as raw bit patterns (int16 for float16 ranges, int32 for float32 ones, so that
    ``model.to(dtype)`` cannot round them), and
    ``bias`` (rows,) or None. ``forward(x) = F.linear(x, W, bias)`` with ``W`` the dequantized
    (out_features, in_features) weight, bitwise equal to the solver's ``QuantResult.weight``.

    Args:
        packed: the codes, grouped by level count.
        lo, hi: (rows, ngroups) grid ranges; kept in float16 when they are float16 values,
            else in float32.
        group_size: columns per range group, or None.
        sym: symmetric grid (zero point L // 2).
        bias: (rows,) or None.
        cache_dequantized: keep the dequantized weight after the first forward (faster, and as
            much memory as the float weight).
    """

    def __init__(
        self,
        packed: PackedCodes,
        lo: Tensor,
        hi: Tensor,
        group_size: int | None,
        sym: bool,
        bias: Tensor | None = None,
        cache_dequantized: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.rows, packed.cols
        self.group_size, self.sym = group_size, sym
        self.cache_dequantized = cache_dequantized
        self.register_buffer("level_classes", packed.classes)
        self.register_buffer("perm", packed.perm)
        dtype = range_dtype(lo, hi)
        bits = torch.int16 if dtype == torch.float16 else torch.int32
        self.register_buffer("lo_bits", lo.to(dtype).view(bits))
        self.register_buffer("hi_bits", hi.to(dtype).view(bits))
        for L, stream in packed.streams.items():
            self.register_buffer(f"codes_{L}", stream)
        self.register_buffer("bias", bias)
        self._cache: Tensor | None = None

    @classmethod
    def from_quantized(
        cls, result: QuantResult, bias: Tensor | None = None, cache_dequantized: bool = False
    ) -> PackedLinear:
        """Pack a solver result.

        Args:
            result: codes (rows, cols), levels (cols,) and the grid of one layer.
            bias: (rows,) bias of the layer, or None.
        Returns:
            The module, on the device of ``result.codes``.
        """
        codes, levels, grid = result.codes, result.levels.to(result.codes.device), result.grid
        if codes.dim() != 2 or levels.shape != codes.shape[1:]:
            raise ValueError(f"codes {tuple(codes.shape)} and levels {tuple(levels.shape)} differ")
        if (levels < 1).any() or (codes < 0).any() or (codes >= levels.unsqueeze(0)).any():
            raise ValueError("codes outside [0, L - 1] of their column: not a solver result")
        packed = pack_columns(codes, levels)
        return cls(packed, grid.lo, grid.hi, grid.group_size, grid.sym, bias, cache_dequantized)

    @property
    def packed(self) -> PackedCodes:
        streams = {L: getattr(self, f"codes_{L}") for L, _ in self.level_classes.tolist() if L > 1}
        return PackedCodes(self.out_features, self.level_classes, self.perm, streams)

    @property
    def grid(self) -> Grid:
        dtype = torch.float16 if self.lo_bits.dtype == torch.int16 else torch.float32
        lo = self.lo_bits.view(dtype).float()
        hi = self.hi_bits.view(dtype).float()
        return Grid(lo=lo, hi=hi, group_size=self.group_size, sym=self.sym)

    @property
    def nominal_bits(self) -> float:
        """Mean of log2 L over the columns (every column has ``out_features`` weights)."""
        L, n = self.level_classes.double().unbind(1)
        return float((n * torch.log2(L)).sum() / n.sum())

    @property
    def storage_nbytes(self) -> int:
        """Bytes of the stored tensors: codes, ranges, classes table and permutation."""
        ranges = self.lo_bits.numel() * self.lo_bits.element_size()
        return self.packed.nbytes() + 2 * ranges

    @property
    def storage_bits(self) -> float:
        return self.storage_nbytes * 8 / (self.out_features * self.in_features)

    def dequantize(self) -> Tensor:
        """(out_features, in_features) float32 weight ``(code - zero) * step`` (quant/grid.py).

        One unpack per level class into the stored (sorted) column order, the grid parameters
        for all columns at once, then one gather back to the original order.
        """
        packed = self.packed
        codes = unpack_sorted(packed)  # (rows, cols), stored order
        step, zero = column_params(self.grid, packed.sorted_levels(), packed.order())
        return packed.unsort(dequantize_codes(codes, step, zero))

    def forward(self, x: Tensor) -> Tensor:
        W = self._cache
        if W is None or W.device != x.device or W.dtype != x.dtype:
            # a normal tensor even under inference_mode, so a cached weight serves any later call
            with torch.inference_mode(False), torch.no_grad():
                W = self.dequantize().to(device=x.device, dtype=x.dtype)
            self._cache = W if self.cache_dequantized else None
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, W, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nominal_bits={self.nominal_bits:.3f}, "
            f"storage_bits={self.storage_bits:.3f}, level_classes={len(self.level_classes)}, "
            f"group_size={self.group_size}, sym={self.sym}"
        )

    def file_tensors(self, name: str) -> dict[str, Tensor]:
        """This layer's tensors under their file names (docs/FORMAT.md)."""
        grid = self.grid
        return layer_tensors(name, self.packed, grid.lo, grid.hi)

    def file_meta(self) -> dict[str, Any]:
        """This layer's entry in the ``layers`` metadata of quantized.safetensors."""
        return {
            "shape": [self.out_features, self.in_features],
            "group_size": self.group_size,
            "sym": self.sym,
        }


def _ngroups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-cols // group_size)


def storage_bits_of(results: dict[str, QuantResult]) -> float:
    """Storage rate a save of ``results`` will have, from the level counts alone (no packing).

    Args:
        results: full module name -> solver result.
    Returns:
        Bytes of the stored quantized-layer tensors times 8, over the quantized weights (the
        number :func:`storage_bits` reads back from the saved folder); 0 for no results.
    """
    nbytes = weights = 0
    for res in results.values():
        rows, cols = res.codes.shape
        ngroups = _ngroups(cols, res.grid.group_size)
        range_bytes = range_dtype(res.grid.lo, res.grid.hi).itemsize
        nbytes += layer_nbytes(rows, ngroups, res.levels, range_bytes)
        weights += rows * cols
    return nbytes * 8 / weights if weights else 0.0


def nominal_bits_of(results: dict[str, QuantResult]) -> float:
    bits = weights = 0.0
    for res in results.values():
        rows, cols = res.codes.shape
        bits += rows * float(torch.log2(res.levels.double()).sum())
        weights += rows * cols
    return bits / weights if weights else 0.0

"""The quantized linear module: packed codes in memory, dequantized in ``forward``.

Also the storage rate of a set of solver results, computed from their level counts alone, so a
run can report the size its save will have without writing it (docs/FORMAT.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baq.config import KERNEL_CACHES, WEIGHT_CACHES
from baq.kernels import runtime
from baq.kernels.layout import MAX_LEVELS as KERNEL_MAX_LEVELS
from baq.quant.gptq import QuantResult
from baq.quant.grid import Grid, column_params, dequantize_codes
from baq.quant.rotation import original_basis
from baq.saved.load_memory import return_freed_memory
from baq.saved.packing import (
    PackedCodes,
    layer_tensors,
    pack_codes,
    pack_columns,
    packed_nbytes,
    range_dtype,
    unpack_sorted,
)
from baq.saved.result_sizes import layer_meta, nominal_bits_of, storage_bits_of  # noqa: F401
from baq.saved.rotation_meta import ROTATION_BYTES, InputRotation

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """A linear layer that keeps its weight packed and dequantizes it in ``forward``.

    Buffers only: ``level_classes`` (K, 2) int32, ``perm`` (cols,) int16/int32 or None,
    ``codes_<L>`` one packed stream per level class, ``lo_bits``/``hi_bits`` (rows, ngroups), per
    IC (ngroups, cols), the ranges as raw bit patterns (int16 for float16 ranges, int32 for
    float32 ones, so that ``model.to(dtype)`` cannot round them), and
    ``bias`` (rows,) or None. ``forward(x) = F.linear(x, W, bias)`` with ``W`` the dequantized
    (out_features, in_features) weight, bitwise equal to the solver's ``QuantResult.weight``.

    A layer quantized with ``--rotate`` (``packed.rotation``, a seed) holds the codes of
    ``W' = W R^T`` (saved/rotation_meta.py): :meth:`transform_input` gives ``R x`` (the identity
    for an unrotated layer), and the caches ``"none"``, ``"codes"`` and ``"kernel"`` multiply
    ``R x`` by the codes. ``"weight"`` keeps :meth:`dequantize`, the weight in the original
    basis ``W' R`` (what the quantization pass wrote into the model, bit for bit), and applies
    it to ``x`` itself: the float layer's speed, no transform per forward.

    Unpacking every forward costs 25 to 100 times the matrix product it feeds on a CPU, which
    prompt processing amortises and token-by-token generation does not; ``cache`` trades memory
    for that time:

    * ``"none"``: nothing kept, the packed codes are all the memory the layer takes;
    * ``"codes"``: :class:`OffsetCodes` kept, one byte per weight (two for a column of more than
      128 levels), a quarter of a float32 weight; the forward folds the grid into the input and
      the output instead of dequantizing, equal to the dequantized forward up to float rounding;
    * ``"weight"``: the dequantized weight kept after the first forward, the float layer's
      memory and speed, bitwise the solver's weight;
    * ``"kernel"`` (the default of loads, :data:`baq.config.DEFAULT_CACHE`): at the first
      forward on the CPU the packed codes are rebuilt as the runtime layout of
      :func:`baq.kernels.runtime.build` (the native kernel's row lanes,
      :mod:`baq.kernels.row_lanes`, or the numba kernel's part streams where nothing compiles)
      and the ``codes_<L>`` buffers emptied, so the layer holds about its packed size (1.08
      times the stored bytes on the rotated 3-bit reference model, 1.04 on 7B-sized layers:
      docs/RESULTS.md, session 21), and :func:`baq.kernels.runtime.linear` multiplies by it
      without a float weight (equal to the dequantized forward up to float32 rounding).
      ``"lanes"``: the same kernel on the column-lane layout of :mod:`baq.kernels.lanes` (1.21
      times there; up to 1.3x faster at one token on 4096- and 14336-column layers).
      ``"compact"``: that layout with the level counts a 32-bit lane holds more of as radix
      digits than as bit fields (3, 5, 6, 9-11, 17, 18, 33-38:
      :func:`baq.kernels.lanes.radix_pays`).
      Whatever reads the codes (``packed``, ``state_dict``, :meth:`file_tensors`,
      :meth:`dequantize`) gets them repacked from the layout, byte for byte the saved streams.
      A layer with more than 256 levels in a column, or an input on another device than the
      CPU (no GPU kernel exists), runs as ``"codes"``.

    Args:
        packed: the codes, grouped by level count.
        lo, hi: (rows, ngroups) grid ranges, per IC (ngroups, cols); kept in float16 when they
            are float16 values, else in float32.
        group_size: columns (per IC: rows) per range group, or None.
        sym: symmetric grid (zero point L // 2).
        bias: (rows,) or None.
        cache: ``"none"``, ``"codes"``, ``"weight"``, ``"kernel"``, ``"lanes"`` or
            ``"compact"`` (above).
        dim: ``"oc"`` (ranges per row) or ``"ic"`` (per column; quant/grid.py).
    """

    def __init__(
        self,
        packed: PackedCodes,
        lo: Tensor,
        hi: Tensor,
        group_size: int | None,
        sym: bool,
        bias: Tensor | None = None,
        cache: str = "none",
        dim: str = "oc",
    ) -> None:
        super().__init__()
        if cache not in WEIGHT_CACHES:
            raise ValueError(f"cache={cache!r}: use one of {', '.join(WEIGHT_CACHES)}")
        if dim not in ("oc", "ic"):
            raise ValueError(f"dim={dim!r}: use oc or ic")
        self.out_features, self.in_features = packed.rows, packed.cols
        self.group_size, self.sym, self.dim = group_size, sym, dim
        self.cache = cache
        self.register_buffer("level_classes", packed.classes)
        self.register_buffer("perm", packed.perm)
        dtype = range_dtype(lo, hi)
        bits = torch.int16 if dtype == torch.float16 else torch.int32
        self.register_buffer("lo_bits", lo.to(dtype).view(bits))
        self.register_buffer("hi_bits", hi.to(dtype).view(bits))
        for L, stream in packed.streams.items():
            self.register_buffer(f"codes_{L}", stream)
        self.register_buffer("bias", bias)
        seed = packed.rotation  # rebuilt from the seed: the transform itself is never stored
        self.rotation = None if seed is None else InputRotation(self.in_features, seed)
        self._weight: Tensor | None = None  # cache == "weight"
        self._offsets: OffsetCodes | None = None  # cache == "codes"
        # cache == "kernel": the layout (in place of the codes_<L> buffers); the ranges stay in
        # their buffers, float16 ones too (the kernel widens them: a float32 copy would hold 3 %
        # of a 3-bit layer of 576 columns)
        self._layout: runtime.RuntimeLayout | None = None
        self._fallback_logged = False
        self._top_levels: tuple[tuple[int, int], int] | None = None  # _kernel_fits
        # _kernel_ranges: the range buffers, and their float views
        self._range_views: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
        # float tensors elsewhere in the model that hold this layer's dequantized weight (the
        # input embedding tied to a packed head): a save stores them once, as this layer
        self.aliases: list[str] = []

    def set_cache(self, cache: str) -> None:
        """Switch what the layer keeps between forwards (:data:`~baq.config.WEIGHT_CACHES`),
        dropping what the old choice kept (a kernel layout goes back to packed codes); the next
        forward builds the new one."""
        if cache not in WEIGHT_CACHES:
            raise ValueError(f"cache={cache!r}: use one of {', '.join(WEIGHT_CACHES)}")
        self._restore_codes()
        self.cache, self._weight, self._offsets = cache, None, None

    # ------------------------------------------------------------------ the kernel layout
    def _kernel_fits(self) -> bool:
        """The layout decodes bytes: at most 256 levels a column (``max_levels`` allows 65536).
        The top count kept per version of ``level_classes`` (a load may copy into it): taking it
        each forward cost about 8 us a call, a twentieth of a small layer's forward."""
        key = (self.level_classes.data_ptr(), self.level_classes._version)
        if self._top_levels is None or self._top_levels[0] != key:
            self._top_levels = (key, int(self.level_classes[:, 0].max()))
        top = self._top_levels[1]
        if top <= KERNEL_MAX_LEVELS:
            return True
        if not self._fallback_logged:
            self._fallback_logged = True
            log.info(
                "%dx%d layer with %d levels in a column (kernel: at most %d): cache 'kernel' "
                "runs it as 'codes'",
                self.out_features, self.in_features, top, KERNEL_MAX_LEVELS,
            )  # fmt: skip
        return False

    def _kernel_ranges(self) -> tuple[Tensor, Tensor]:
        """Float16 or float32 views of the range buffers (the kernel widens float16), kept while
        the buffers are the same tensors: ``grid`` made and widened them each call, 13 us, a
        tenth of a 576x1536 layer's forward at one token (a float32 copy: 3 % more memory)."""
        lo, hi = self._buffers["lo_bits"], self._buffers["hi_bits"]
        kept = self._range_views
        if kept is None or kept[0][0] is not lo or kept[0][1] is not hi:
            dtype = self._range_dtype
            # made outside inference mode: a first forward under torch.inference_mode() would
            # hand later training (PEFT LoRA saves them for its backward) inference tensors
            with torch.inference_mode(False):
                kept = self._range_views = ((lo, hi), (lo.view(dtype), hi.view(dtype)))
        return kept[1]

    def _build_layout(self) -> runtime.RuntimeLayout:
        """Rebuild the codes as the kernel layout and empty the ``codes_<L>`` buffers: the
        layout replaces them (issue 26: resident memory at about the packed size)."""
        packed = self.packed
        codes = packed.unsort(unpack_sorted(packed)).cpu()
        layout = runtime.build(
            codes, packed.levels().cpu(), self.group_size, self.sym, self.dim,
            radix=self.cache == "compact", rows=self.cache == "kernel",
        )  # fmt: skip
        del codes
        for L, stream in packed.streams.items():
            setattr(self, f"codes_{L}", stream.new_empty(0))
        self._layout = layout
        return_freed_memory()  # the int64 codes of the build
        return layout

    def _repacked(self) -> dict[int, Tensor]:
        """The ``codes_<L>`` streams from the layout: the file's bytes (docs/FORMAT.md), since
        packing is a function of the codes and the stored class order alone."""
        assert self._layout is not None
        codes = self._layout.unpack()
        order = PackedCodes(self.out_features, self.level_classes.cpu(), self.perm, {})
        device = self.level_classes.device
        return {
            L: pack_codes(codes[:, cols.cpu()].reshape(-1), L).to(device)
            for L, cols in order.columns()
            if L > 1
        }

    def _restore_codes(self) -> None:
        """Put the packed codes back in their buffers and drop the layout."""
        if self._layout is None:
            return
        for L, stream in self._repacked().items():
            setattr(self, f"codes_{L}", stream)
        self._layout = None

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._layout is not None:  # the emptied buffers: their saved bytes, from the layout
            for L, stream in self._repacked().items():
                destination[f"{prefix}codes_{L}"] = stream

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        self._restore_codes()  # the buffers at full size again, then loaded as usual
        self._offsets = self._weight = None
        super()._load_from_state_dict(state_dict, prefix, *args)

    @classmethod
    def from_quantized(
        cls, result: QuantResult, bias: Tensor | None = None, cache: str = "none"
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
        packed = replace(pack_columns(codes, levels), rotation=result.rotation)
        return cls(packed, grid.lo, grid.hi, grid.group_size, grid.sym, bias, cache, grid.dim)

    @property
    def rotation_seed(self) -> int | None:
        """The seed of the input-side rotation the codes are in, or None."""
        return None if self.rotation is None else self.rotation.seed

    @property
    def packed(self) -> PackedCodes:
        if self._layout is not None:
            streams = self._repacked()
        else:
            classes = self.level_classes.tolist()
            streams = {L: getattr(self, f"codes_{L}") for L, _ in classes if L > 1}
        return PackedCodes(
            self.out_features, self.level_classes, self.perm, streams, self.rotation_seed
        )

    @property
    def _range_dtype(self) -> torch.dtype:
        """The float dtype whose bits the range buffers hold (int16: float16, int32: float32)."""
        return torch.float16 if self.lo_bits.dtype == torch.int16 else torch.float32

    @property
    def grid(self) -> Grid:
        dtype = self._range_dtype
        lo = self.lo_bits.view(dtype).float()
        hi = self.hi_bits.view(dtype).float()
        return Grid(lo=lo, hi=hi, group_size=self.group_size, sym=self.sym, dim=self.dim)

    @property
    def nominal_bits(self) -> float:
        """Mean of log2 L over the columns (every column has ``out_features`` weights)."""
        L, n = self.level_classes.double().unbind(1)
        return float((n * torch.log2(L)).sum() / n.sum())

    @property
    def storage_nbytes(self) -> int:
        """Bytes of the stored tensors: codes, ranges, classes table, permutation, seed."""
        ranges = self.lo_bits.numel() * self.lo_bits.element_size()
        tables = [self.level_classes] + ([] if self.perm is None else [self.perm])
        codes = sum(packed_nbytes(L, n * self.out_features) for L, n in self.level_classes.tolist())
        seed = 0 if self.rotation is None else ROTATION_BYTES
        return sum(t.numel() * t.element_size() for t in tables) + codes + 2 * ranges + seed

    def resident_nbytes(self) -> int:
        """Bytes this layer holds now: its buffers and whatever its cache keeps (the layout and
        its float32 ranges, the offset codes or the dequantized weight)."""
        held = sum(b.numel() * b.element_size() for b in self.buffers())
        if self._layout is not None:
            held += self._layout.nbytes()
        if self._offsets is not None:
            held += self._offsets.nbytes()
        if self._weight is not None:
            held += self._weight.numel() * self._weight.element_size()
        return held + (0 if self.rotation is None else self.rotation.nbytes())

    @property
    def storage_bits(self) -> float:
        return self.storage_nbytes * 8 / (self.out_features * self.in_features)

    def dequantize(self, rotated: bool = False) -> Tensor:
        """(out_features, in_features) float32 weight ``(code - zero) * step`` (quant/grid.py),
        in the original input basis: ``W' R`` for a rotated layer
        (:func:`~baq.quant.rotation.original_basis`, bitwise the weight the quantization pass
        wrote into the model); with ``rotated`` the codes' own ``W'``, which multiplies
        :meth:`transform_input`'s ``R x``.

        One unpack per level class into the stored (sorted) column order, the grid parameters
        for all columns at once, then one gather back to the original order.
        """
        packed = self.packed
        codes = unpack_sorted(packed)  # (rows, cols), stored order
        step, zero = column_params(
            self.grid, packed.sorted_levels(), packed.order(), self.out_features
        )
        W = packed.unsort(dequantize_codes(codes, step, zero))
        return W if rotated else original_basis(W, self.rotation_seed)

    def transform_input(self, x: Tensor) -> Tensor:
        """``R x`` along the last dimension (``x`` itself for an unrotated layer): the input the
        codes, :meth:`offset_codes` and ``dequantize(rotated=True)`` apply to."""
        return x if self.rotation is None else self.rotation(x)

    def offset_codes(self) -> OffsetCodes:
        """The layer as :class:`OffsetCodes`: ``W[r, c] = D[r, c] * span[r, g(c)] * inv[c]``
        (per IC ``span[g(r), c]``)."""
        packed = self.packed
        step, zero = column_params(
            self.grid, packed.sorted_levels(), packed.order(), self.out_features
        )
        offsets = packed.unsort(unpack_sorted(packed) - zero.to(torch.int64))
        levels = packed.levels()
        # |code - zero| <= L - 1, so int8 holds every column of at most 128 levels
        small = int(levels.max()) <= 128
        offsets = offsets.to(torch.int8 if small else torch.int16)
        inv = torch.where(levels > 1, 1.0 / (levels - 1).clamp(min=1).double(), 0.0).float()
        grid = self.grid
        return OffsetCodes(offsets, grid.hi - grid.lo, inv, self.group_size, self.dim)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        kernel = self.cache in KERNEL_CACHES and x.device.type == "cpu"
        kernel = kernel and self._kernel_fits()
        if kernel:
            layout = self._layout
            if layout is None:
                with torch.inference_mode(False), torch.no_grad():
                    layout = self._build_layout()
            lo, hi = self._kernel_ranges()
            return runtime.linear(layout, self.transform_input(x), lo, hi, bias)
        if self.cache == "codes" or self.cache in KERNEL_CACHES:
            offsets = self._offsets
            if offsets is None or offsets.offsets.device != x.device:
                with torch.inference_mode(False), torch.no_grad():
                    offsets = self.offset_codes().to(x.device)
                    return_freed_memory()
                self._offsets = offsets
            return offsets.linear(self.transform_input(x), bias)
        # "none": the codes' basis, x rotated (cheaper than unrotating W every forward);
        # "weight": the original basis, kept (the transform then costs nothing)
        rotated = self.cache == "none" and self.rotation is not None
        W = self._weight
        if W is None or W.device != x.device or W.dtype != x.dtype:
            # a normal tensor even under inference_mode, so a cached weight serves any later call
            with torch.inference_mode(False), torch.no_grad():
                W = self.dequantize(rotated).to(device=x.device, dtype=x.dtype)
            self._weight = W if self.cache == "weight" else None
        return F.linear(self.transform_input(x) if rotated else x, W, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nominal_bits={self.nominal_bits:.3f}, "
            f"storage_bits={self.storage_bits:.3f}, level_classes={len(self.level_classes)}, "
            f"group_size={self.group_size}, sym={self.sym}, dim={self.dim}, cache={self.cache}"
            + ("" if self.rotation is None else f", rotation_seed={self.rotation_seed}")
        )

    def file_tensors(self, name: str) -> dict[str, Tensor]:
        """This layer's tensors under their file names (docs/FORMAT.md)."""
        grid = self.grid
        return layer_tensors(name, self.packed, grid.lo, grid.hi)

    def file_meta(self) -> dict[str, Any]:
        """This layer's entry in the ``layers`` metadata of quantized.safetensors."""
        shape = (self.out_features, self.in_features)
        return layer_meta(shape, self.group_size, self.sym, self.dim)


@dataclass(frozen=True)
class OffsetCodes:
    """A quantized weight factored as integer offsets and two scale vectors, for a fast forward.

    The grid of quant/grid.py gives ``W[r, c] = (code - zero) * (hi - lo)[r, g(c)] / (L_c - 1)``;
    with ``D = code - zero`` this is ``D[r, c] * span[r, g(c)] * inv[c]``, so

        ``y[t, r] = sum_g span[r, g] * sum_{c in g} D[r, c] * (x[t, c] * inv[c])``,

    a product of the small-integer matrix ``D`` (converted to the input's dtype, exactly: its
    values are below 256) with the input scaled per column, then a scale per row and group.
    No dequantized weight exists at any time; the result equals ``x @ W.T`` up to the rounding
    of a different summation order and of ``span * inv`` against ``span / (L - 1)``.

    Per IC (``dim="ic"``) the scale belongs to the column, or to the column and a group of rows:
    ``W[r, c] = D[r, c] * s[g(r), c]`` with ``s = span * inv``, so the whole scale folds into the
    input side, ``y[t, r] = sum_c D[r, c] * (x[t, c] * s[g(r), c])``: one product of ``D`` with
    the scaled input without row groups, one per row group (each on its own rows of ``D``) with
    them; the same multiply-adds as the per-OC forward and no scale on the output. The zero
    points need no term of their own: ``D`` already holds ``code - zero``.

    Attributes:
        offsets: (rows, cols) int8 (int16 when a column has more than 128 levels) ``code - zero``
            in the original column order; 0 for single-level columns.
        span: (rows, ngroups) float32 ``hi - lo``; per IC (ngroups, cols).
        inv: (cols,) float32 ``1 / (L_c - 1)``, 0 for single-level columns.
        group_size: columns (per IC: rows) per range group, or None.
        dim: "oc" or "ic".
    """

    offsets: Tensor
    span: Tensor
    inv: Tensor
    group_size: int | None
    dim: str = "oc"

    def to(self, device: torch.device | str) -> OffsetCodes:
        return OffsetCodes(
            self.offsets.to(device),
            self.span.to(device),
            self.inv.to(device),
            self.group_size,
            self.dim,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.offsets, self.span, self.inv))

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``F.linear(x, W, bias)`` for ``x`` (..., cols), computed in ``x.dtype``."""
        dtype = x.dtype
        rows, cols = self.offsets.shape
        if self.dim == "ic":
            return self._linear_ic(x, bias)
        scaled = x * self.inv.to(dtype)
        D = self.offsets.to(dtype)
        if self.span.shape[1] == 1:
            y = F.linear(scaled, D) * self.span[:, 0].to(dtype)
        else:
            # one product per group: (G, T, gs) @ (G, gs, rows), then the span of each group
            gs, G = self.group_size, self.span.shape[1]
            pad = G * gs - cols
            flat = F.pad(scaled.reshape(-1, cols), (0, pad)).view(-1, G, gs).transpose(0, 1)
            D = F.pad(D, (0, pad)).view(rows, G, gs).permute(1, 2, 0)
            parts = torch.bmm(flat, D)  # (G, T, rows)
            y = (parts * self.span.t().to(dtype).unsqueeze(1)).sum(0)
            y = y.view(*x.shape[:-1], rows)
        return y if bias is None else y + bias

    def _linear_ic(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """Per-IC forward: the scale of each (row group, column) applied to the input."""
        dtype = x.dtype
        rows, cols = self.offsets.shape
        scale = (self.span * self.inv.unsqueeze(0)).to(dtype)  # (G, cols)
        D = self.offsets.to(dtype)
        if scale.shape[0] == 1:
            y = F.linear(x * scale[0], D)
        else:
            # one product per row group on its own rows of D (views, the ragged last one shorter);
            # on CPU faster than a padded batched product, which copies D every forward
            gs = self.group_size
            parts = [F.linear(x * s, D[k * gs : (k + 1) * gs]) for k, s in enumerate(scale)]
            y = torch.cat(parts, dim=-1)
        return y if bias is None else y + bias


def set_cache(model: nn.Module, cache: str) -> int:
    """Set the cache of every :class:`PackedLinear` of ``model`` (a model loaded with
    ``from_pretrained``, which always builds ``"codes"``, or with :func:`baq.load`).

    Returns:
        How many layers were switched.
    Raises:
        ValueError: ``cache`` is not one of :data:`WEIGHT_CACHES`.
    """
    if cache not in WEIGHT_CACHES:
        raise ValueError(f"cache={cache!r}: use one of {', '.join(WEIGHT_CACHES)}")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for layer in layers:
        layer.set_cache(cache)
    return len(layers)

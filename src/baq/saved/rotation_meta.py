"""A saved layer's input-side rotation (docs/FORMAT.md, section 6): the seed stored, the transform
rebuilt from it at load time, and what a packed forward applies to its inputs.

A layer quantized with ``--rotate`` holds codes and ranges of ``W' = W R^T``, with ``R`` the
seeded randomized Hadamard transform of :class:`baq.quant.rotation.HadamardRotation`; it
computes ``W x = W' (R x)``. Nothing but the seed is stored, as one more tensor of the layer,
``N.rotation`` (int64, one element), absent for an unrotated layer: a folder written before it
reads as it did, and a reader that does not know it refuses the folder ("unexpected tensor")
instead of applying the codes to unrotated inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from baq.quant.rotation import (
    SUPPORTED,
    HadamardRotation,
    hadamard_factors,
    paley_factor,
    supported,
)

# tokens up to which a CPU forward rotates in one native call (baq.kernels.native.rotate): one
# token 40 us against 99 (576 columns), 165 against 298 (14336), two threads, session 20; at 8
# tokens torch's blocked transform, whose (h, h) products BLAS runs, is as fast or faster
NATIVE_ROTATE_TOKENS = 4

ROTATION_BYTES = 8  # the stored seed: one int64


def rotation_tensors(name: str, seed: int | None) -> dict[str, Tensor]:
    """``{N.rotation: (1,) int64 seed}`` of a rotated layer ``N``; nothing without a rotation."""
    if seed is None:
        return {}
    return {f"{name}.rotation": torch.tensor([seed], dtype=torch.int64)}


def read_rotation(name: str, tensors: dict[str, Tensor], cols: int) -> int | None:
    """Take layer ``N``'s rotation seed out of ``tensors`` (None when it has none), checked.

    Raises:
        ValueError: one line naming the tensor: not one int64, a negative seed, or a width
            with no transform (:data:`~baq.quant.rotation.SUPPORTED`).
    """
    key = f"{name}.rotation"
    if key not in tensors:
        return None
    t = tensors.pop(key)
    if t.dtype != torch.int64 or tuple(t.shape) != (1,):
        raise ValueError(
            f"tensor {key} is {str(t.dtype).replace('torch.', '')} with shape {tuple(t.shape)}: "
            "expected one int64 seed"
        )
    seed = int(t[0])
    if seed < 0:
        raise ValueError(f"tensor {key} holds the seed {seed}: expected a non-negative one")
    if not supported(cols):
        raise ValueError(
            f"tensor {key}: no randomized Hadamard transform of {cols} columns ({SUPPORTED})"
        )
    return seed


class InputRotation:
    """``x -> R x`` of a packed layer's forward, with the random signs kept per device and
    dtype: drawing them costs more than the transform of one token.

    Args:
        cols: the layer's input features; seed: the stored seed.
    """

    def __init__(self, cols: int, seed: int) -> None:
        self.rot = HadamardRotation(cols, seed)
        self._signs: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # the native path's function, float32 CPU signs and Paley factor (None for a power of
        # two), made at its first call
        self._native: tuple[Callable, Tensor, Tensor | None] | None = None

    @property
    def seed(self) -> int:
        return self.rot.seed

    def __call__(self, x: Tensor) -> Tensor:
        """``R x`` along the last dimension, in ``x``'s dtype (computed in float32 for half
        types, as :class:`~baq.quant.rotation.HadamardRotation` does): a few tokens on the CPU
        by one native call, else by the blocked transform
        (:func:`~baq.quant.rotation.fwht_blocked`: a few dense products per call)."""
        work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        if (
            work == torch.float32
            and x.device.type == "cpu"
            and x.numel() <= NATIVE_ROTATE_TOKENS * self.rot.n
            and not (torch.is_grad_enabled() and x.requires_grad)  # LoRA: torch's, with grads
        ):
            # kept from the first call: looking up each part costs more than the transform
            native = self._native_parts()
            if native is not None:
                rotate, signs, factor = native
                y = rotate(x if x.dtype == work else x.to(work), signs, factor)
                return y if y.dtype == x.dtype else y.to(x.dtype)
        return self.rot.apply(x, self._signs_for(x.device, work), blocked=True)

    def _signs_for(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The random signs on ``device`` in ``dtype``, drawn once."""
        key = (device, dtype)
        signs = self._signs.get(key)
        if signs is None:
            # kept across calls: made outside inference mode, or a first forward under
            # torch.inference_mode() would hand later training (PEFT LoRA) an inference tensor
            with torch.inference_mode(False):
                signs = self._signs[key] = self.rot.signs(device, dtype)
        return signs

    def _native_parts(self) -> tuple[Callable, Tensor, Tensor | None] | None:
        """What the native transform takes (:attr:`_native`), made at the first call; None
        where this machine has no compiled library."""
        if self._native is None:
            from baq.kernels import native  # the compiled library, if this machine has one

            if native.library() is not None:
                cpu, work = torch.device("cpu"), torch.float32
                h, _ = hadamard_factors(self.rot.n)
                with torch.inference_mode(False):
                    factor = paley_factor(h, work, cpu) if h > 1 else None
                self._native = (native.rotate, self._signs_for(cpu, work), factor)
        return self._native

    def nbytes(self) -> int:
        """Bytes of the signs kept."""
        return sum(s.numel() * s.element_size() for s in self._signs.values())

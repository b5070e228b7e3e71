"""The native rotation (baq.kernels.native.rotate, what a packed layer's CPU forward applies to
a few tokens) against the dense matrix of its definition, and autograd kept on torch's path."""

import pytest
import torch

from baq.kernels import native
from baq.quant.rotation import hadamard_factors, paley_factor
from baq.saved.rotation_meta import NATIVE_ROTATE_TOKENS, InputRotation

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native kernel here")


@pytest.mark.parametrize("n", [1, 16, 160, 224, 576, 1536, 4096, 14336])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_native_rotation_is_the_matrix(n, tokens):
    rot = InputRotation(n, seed=n + tokens)
    R = rot.rot.matrix(torch.float64)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(n))
    h, _ = hadamard_factors(n)
    hh = None if h == 1 else paley_factor(h, torch.float32, x.device)
    y = native.rotate(x, rot.rot.signs(dtype=torch.float32), hh)
    ref = x.double() @ R.T
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_rotation_takes_either_path_to_the_same_result(dtype):
    n = 576
    rot = InputRotation(n, seed=3)
    R = rot.rot.matrix(torch.float64)
    for tokens in (1, NATIVE_ROTATE_TOKENS, NATIVE_ROTATE_TOKENS + 1):  # native, native, torch
        x = torch.randn(1, tokens, n).to(dtype)  # the threshold counts rows of x
        y = rot(x)
        assert y.dtype == dtype and y.shape == x.shape
        ref = x.double() @ R.T
        tol = (1e-5 if dtype == torch.float32 else 1e-2) * ref.abs().max()
        assert (y.double() - ref).abs().max() <= tol


def test_a_gradient_passes_the_rotation():
    rot = InputRotation(576, seed=5)
    R = rot.rot.matrix(torch.float32)
    x = torch.randn(1, 576, requires_grad=True)
    w = torch.randn(576)
    (rot(x) @ w).sum().backward()
    # d/dx (R x) . w = R^T w
    assert torch.allclose(x.grad[0], R.T @ w, atol=1e-4)

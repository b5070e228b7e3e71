"""Incoherence processing by a seeded randomized Hadamard transform (issue 27, item 2).

QuIP (Chee et al., 2023) shows that rounding with GPTQ-style error feedback (their LDLQ) is
much better behaved when the weight and the Hessian are *incoherent*: no entry of ``W`` and no
entry of ``H``'s eigenvectors is large against the average. Multiplying by random orthogonal
matrices makes them so with high probability (QuIP, section 4). QuIP# (Tseng et al., 2024,
section 3) uses the randomized Hadamard transform (RHT)

    R = H_n diag(s) / sqrt(n),      s_i in {-1, +1} uniformly at random,                (RHT)

which costs ``O(n log n)`` instead of a dense ``O(n^2)`` product, and for ``n`` not a power of
two takes ``H_n = H_h kron H_{2^k}``, ``n = h 2^k``, with a small Hadamard matrix of order ``h``.

Here ``H_{2^k}`` is Sylvester's matrix ``H_2^{kron k}`` (natural order), applied by the fast
Walsh-Hadamard butterfly, and ``H_h`` for ``h in {12, 20, 28, 36}`` comes from Paley's
constructions (Paley, 1933) from the quadratic residues modulo a prime ``q``:

- Paley I, ``q = 3 (mod 4)``, order ``q + 1`` (12 from 11, 20 from 19): with the Jacobsthal
  matrix ``Q_ij = chi(j - i)`` (``chi`` the Legendre symbol) and the skew conference matrix
  ``C = [[0, 1^T], [-1, Q]]``, ``H = I + C``: ``H H^T = I + C C^T = (q + 1) I``.
- Paley II, ``q = 1 (mod 4)``, order ``2 (q + 1)`` (28 from 13, 36 from 17): ``Q`` is symmetric,
  ``C = [[0, 1^T], [1, Q]]`` a symmetric conference matrix (``C^2 = q I``), and
  ``H = C kron [[1, 1], [1, -1]] + I kron [[1, -1], [-1, -1]]``.

``R`` is orthogonal, so a layer rotated on its input side computes the same function:
``W' = W R^T``, ``x' = R x``, ``W' x' = W x``; the Hessian ``H = 2 X X^T / n`` of the inputs
becomes ``R H R^T`` (:func:`rotate_input`), and GPTQ's proxy loss ``tr((W - Q) H (W - Q)^T)`` is
the same quantity in either basis. The output side (``W'' = Q W'``, outputs rotated back by
``Q^T`` at run time) leaves the Hessian unchanged (:func:`rotate_output`). Nothing is stored
but the seed: the signs are drawn from a ``torch.Generator`` seeded with it, on the CPU, so the
same seed gives the same transform on every device.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

# small Hadamard orders and the prime of their Paley construction: order q + 1 (I), 2 (q + 1) (II)
PALEY = {12: (11, 1), 20: (19, 1), 28: (13, 2), 36: (17, 2)}
SUPPORTED = "2^k, or h * 2^k with h in {12, 20, 28, 36}"


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(h, p)`` with ``n = h p``, ``p`` a power of two and ``h`` 1 or a Paley order.

    The odd part ``m`` of ``n`` fixes the decomposition: ``h = 4 m`` (12, 20, 28, 36 have the odd
    parts 3, 5, 7, 9), so it is unique.

    Raises:
        ValueError: ``n`` has no construction here.
    """
    if n >= 1:
        odd = n
        while odd % 2 == 0:
            odd //= 2
        if odd == 1:
            return 1, n
        h = 4 * odd
        if h in PALEY and n % h == 0:
            return h, n // h
    raise ValueError(f"no Hadamard transform of size {n}: supported sizes are {SUPPORTED}")


def supported(n: int) -> bool:
    """Whether a transform of size ``n`` exists here (:data:`SUPPORTED`)."""
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


def legendre(q: int) -> Tensor:
    """(q,) int64 Legendre symbol ``chi(a)`` of ``a = 0..q-1`` modulo the odd prime ``q``."""
    chi = -torch.ones(q, dtype=torch.int64)
    chi[torch.tensor(sorted({(a * a) % q for a in range(1, q)}))] = 1
    chi[0] = 0
    return chi


def conference_matrix(q: int) -> Tensor:
    """(q+1, q+1) Paley conference matrix ``[[0, 1^T], [+-1, Q]]``, ``Q_ij = chi(j - i)``.

    Skew (``C^T = -C``) for ``q = 3 (mod 4)``, symmetric for ``q = 1 (mod 4)``; ``C C^T = q I``.
    """
    idx = torch.arange(q)
    Q = legendre(q)[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = -1 if q % 4 == 3 else 1
    C[1:, 1:] = Q
    return C


def small_hadamard(h: int) -> Tensor:
    """(h, h) float64 Hadamard matrix (entries +-1, ``H H^T = h I``) of a Paley order ``h``,
    or ``[[1]]`` for ``h = 1``."""
    return _paley_hadamard(h).clone()


@cache
def _paley_hadamard(h: int) -> Tensor:
    """:func:`small_hadamard`, built once per order (every layer of a width shares it); callers
    here only read it, the public function hands out copies. Built outside inference mode, as
    :func:`_dense_factor` is."""
    with torch.inference_mode(False):
        return _build_paley(h)


def _build_paley(h: int) -> Tensor:
    if h == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if h not in PALEY:
        raise ValueError(f"no small Hadamard matrix of order {h}: use one of {sorted(PALEY)}")
    q, kind = PALEY[h]
    C = conference_matrix(q)
    if kind == 1:  # Paley I: H = I + C, C skew
        H = torch.eye(q + 1, dtype=torch.int64) + C
    else:  # Paley II: C symmetric
        one = torch.tensor([[1, 1], [1, -1]])
        two = torch.tensor([[1, -1], [-1, -1]])
        H = torch.kron(C, one) + torch.kron(torch.eye(q + 1, dtype=torch.int64), two)
    return H.double()


def sylvester(p: int) -> Tensor:
    """(p, p) float64 Sylvester Hadamard matrix ``H_2^{kron log2 p}`` (natural order, symmetric):
    the dense reference of :func:`fwht`."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, not {p}")
    H = torch.ones(1, 1, dtype=torch.float64)
    H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while H.shape[0] < p:
        H = torch.kron(H2, H)
    return H


def fwht(x: Tensor) -> Tensor:
    """Unnormalised fast Walsh-Hadamard transform of the last dimension (a power of two):
    ``x @ H_p`` with Sylvester's ``H_p``, in ``log2 p`` butterfly steps of ``O(p)`` each.

    Step ``i`` pairs the entries ``2^i`` apart: with the last dimension viewed as
    ``(p / 2^(i+1), 2, 2^i)``, ``(a, b) -> (a + b, a - b)`` along the middle axis is
    ``I kron H_2 kron I``; the product of all the steps is ``H_2^{kron log2 p}``.
    """
    p = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    half = 1
    while half < p:
        v = y.view(-1, p // (2 * half), 2, half)
        a, b = v[:, :, 0], v[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, p)
        half *= 2
    return y.view(*lead, p)


# largest dense factor of the blocked transform (fwht_blocked): 1 to 3 products cover every
# width up to 32768; on 2 CPU threads 3-4x faster than the butterfly at 1 and 16 tokens
BLOCK = 32


def fwht_blocked(x: Tensor, block: int | None = None) -> Tensor:
    """:func:`fwht` as a few dense products, for the run-time transform of activations.

    Sylvester's ``H_p = H_2^{kron log2 p}`` is also ``H_{f_1} kron ... kron H_{f_k}`` for any
    powers of two ``f_1 ... f_k = p``. With the last dimension viewed as ``(p / f, f)`` the
    product with ``H_f`` on the right applies the fastest factor; the transpose then makes that
    axis the slowest, so after the ``k`` factors the axes are back in their order. Each step is
    one matrix product and one copy instead of ``log2 f`` butterfly steps of three kernels each,
    which is what a token's transform pays for. The summation order is BLAS's, not fixed: the
    weights' transform (:func:`original_basis`) keeps the butterfly, whose result is the same
    on every device.
    """
    block = BLOCK if block is None else block
    p = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    m, left = y.shape[0], p
    while left > 1:
        f = min(block, left)
        Hf = _dense_factor("sylvester", f, y.dtype, y.device)
        y = (y.reshape(-1, f) @ Hf).view(m, p // f, f).transpose(1, 2).reshape(m, p)
        left //= f
    return y.view(*lead, p)


@cache
def _dense_factor(kind: str, f: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A Sylvester or Paley factor in a dtype on a device, made once (read-only to callers), and
    outside inference mode: a cached inference tensor would break a later autograd forward."""
    with torch.inference_mode(False):
        M = sylvester(f) if kind == "sylvester" else _paley_hadamard(f)
        return M.to(device=device, dtype=dtype)


def paley_factor(h: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``(h, h)`` Paley factor of :func:`hadamard_transform` in a dtype on a device, made once
    (read-only to callers)."""
    return _dense_factor("paley", h, dtype, device)


def hadamard_transform(x: Tensor, transpose: bool = False, blocked: bool = False) -> Tensor:
    """Unnormalised ``H_n x`` (or ``H_n^T x``) along the last dimension, ``H_n = H_h kron H_p``.

    With the last dimension viewed as ``(h, p)`` row-major, ``(H_h kron H_p) vec(X) =
    vec(H_h X H_p^T)``: the butterfly on ``p`` (:func:`fwht_blocked` with ``blocked``) and a
    dense ``(h, h)`` product on ``h``, ``O(n (log p + h))`` in all. Sylvester's ``H_p`` is
    symmetric; a Paley I ``H_h`` is not, hence ``transpose``.
    """
    n = x.shape[-1]
    h, p = hadamard_factors(n)
    wht = fwht_blocked if blocked else fwht
    y = wht(x) if h == 1 else wht(x.reshape(*x.shape[:-1], h, p))
    if h > 1:
        if blocked:
            Hh = _dense_factor("paley", h, x.dtype, x.device)
        else:
            Hh = _paley_hadamard(h).to(device=x.device, dtype=x.dtype)
        y = torch.matmul(Hh.t() if transpose else Hh, y).reshape(x.shape)
    return y


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one layer from the run's seed and the layer's name: stable across
    processes and Python versions (unlike ``hash``), so a reader regenerates the same ``R``."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class HadamardRotation:
    """The orthogonal ``R = H_n diag(s) / sqrt(n)`` of equation (RHT), acting on the last
    dimension; ``s`` is drawn from ``seed`` (and ``n``), so ``(n, seed)`` is all it stores.

    Attributes:
        n: the dimension; one of :data:`SUPPORTED` (checked when built).
        seed: of the ``torch.Generator`` the signs are drawn from.
    """

    n: int
    seed: int

    def __post_init__(self):
        hadamard_factors(self.n)

    def signs(self, device: torch.device | str | None = None, dtype=torch.float32) -> Tensor:
        """(n,) the random signs ``s``, drawn on the CPU (device-independent) then moved."""
        g = torch.Generator().manual_seed(int(self.seed))
        s = torch.randint(0, 2, (self.n,), generator=g, dtype=torch.int64) * 2 - 1
        return s.to(device=device, dtype=dtype)

    def apply(self, x: Tensor, signs: Tensor | None = None, blocked: bool = False) -> Tensor:
        """``R x`` for every vector ``x`` along the last dimension (``x @ R^T`` for a matrix).

        ``signs``: :meth:`signs` on ``x``'s device in the working dtype, if the caller keeps
        them (a layer's forward does: drawing them costs more than a small transform);
        ``blocked``: the faster transform of dense factors (:func:`fwht_blocked`), for
        activations."""
        y, dtype = self._work(x)
        s = self.signs(y.device, y.dtype) if signs is None else signs
        y = hadamard_transform(y * s, blocked=blocked)
        return (y / math.sqrt(self.n)).to(dtype)

    def inverse(self, x: Tensor, signs: Tensor | None = None) -> Tensor:
        """``R^T x`` along the last dimension: ``diag(s) H_n^T x / sqrt(n)``."""
        y, dtype = self._work(x)
        s = self.signs(y.device, y.dtype) if signs is None else signs
        y = hadamard_transform(y, transpose=True) * s
        return (y / math.sqrt(self.n)).to(dtype)

    def matrix(self, dtype=torch.float64, device: torch.device | str | None = None) -> Tensor:
        """(n, n) dense ``R``, built from the definition (the reference of :meth:`apply`)."""
        h, p = hadamard_factors(self.n)
        Hn = torch.kron(_paley_hadamard(h), sylvester(p))
        R = Hn * self.signs(dtype=torch.float64).unsqueeze(0) / math.sqrt(self.n)
        return R.to(device=device, dtype=dtype)

    def _work(self, x: Tensor) -> tuple[Tensor, torch.dtype]:
        """``x`` in a working float dtype (float32 for half types), and the dtype to return."""
        if x.shape[-1] != self.n:
            raise ValueError(f"last dimension {x.shape[-1]} does not match the rotation's {self.n}")
        if not x.is_floating_point():
            raise ValueError(f"rotating needs a float tensor, not {x.dtype}")
        work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        return x.to(work), x.dtype


def rotate_input(
    W: Tensor, H: Tensor | None, rot: HadamardRotation
) -> tuple[Tensor, Tensor | None]:
    """A layer in the rotated input basis: ``W' = W R^T`` and ``H' = R H R^T``.

    With ``x' = R x`` at run time ``W' x' = W x``; ``H = 2 X X^T / n`` of the inputs becomes
    ``2 (R X)(R X)^T / n = R H R^T``, so GPTQ, BAQ's sensitivities and the clipping search run
    unchanged on ``(W', H')``. ``H'`` is symmetrised: the two products round differently.

    Args:
        W: (rows, cols) weights, ``cols == rot.n``; H: (cols, cols) or None.
    Returns:
        ``(W', H')`` in the dtypes given.
    """
    Wr = rot.apply(W)
    if H is None:
        return Wr, None
    # rows of H -> A = H R^T; the rows of A^T (H symmetric: R H) -> R H R^T. A chunk of rows at
    # a time, so that besides H the transform holds A and the result (the butterfly's own
    # temporaries, about four copies of its input, stay a chunk's): a 28672-column float32
    # Hessian is 3.3 GB
    A = _apply_rows(rot, H)
    Hr = _apply_rows(rot, A.mT)
    del A
    _symmetrise_(Hr)
    return Wr, Hr


ROW_CHUNK = 256  # rows transformed at a time by rotate_input


def _apply_rows(rot: HadamardRotation, M: Tensor) -> Tensor:
    """``M R^T`` (``rot.apply`` on every row), :data:`ROW_CHUNK` rows at a time. Each row is
    transformed on its own, so this equals the whole-matrix result up to the summation order
    BLAS picks for the small dense Hadamard factor at a given row count (bitwise where the
    width is a power of two); the chunk is fixed, so every run gives the same bits."""
    out = torch.empty(M.shape, dtype=M.dtype, device=M.device)
    signs = rot.signs(M.device, rot._work(M[:1])[0].dtype)
    for i in range(0, M.shape[0], ROW_CHUNK):
        out[i : i + ROW_CHUNK] = rot.apply(M[i : i + ROW_CHUNK], signs=signs)
    return out


def _symmetrise_(M: Tensor) -> None:
    """``M <- (M + M^T) / 2`` in place, block by block (bitwise the out-of-place expression:
    each pair of entries gets the same sum, halved): the two products of :func:`rotate_input`
    round differently."""
    n, b = M.shape[0], ROW_CHUNK
    for i in range(0, n, b):
        for j in range(i, n, b):
            upper = M[i : i + b, j : j + b]
            t = (upper + M[j : j + b, i : i + b].mT) / 2
            upper.copy_(t)
            M[j : j + b, i : i + b].copy_(t.mT)


def unrotate_input(Wr: Tensor, rot: HadamardRotation) -> Tensor:
    """The original basis back from a rotated (or quantized rotated) weight: ``W = W' R``."""
    return rot.inverse(Wr)


def original_basis(Wr: Tensor, seed: int | None) -> Tensor:
    """A quantized rotated weight in the original input basis, ``W = W' R``, as float32; ``Wr``
    itself with ``seed`` None (no rotation).

    The one definition of the weight a rotated layer computes with: the quantization pass writes
    it into the model, a saved layer's ``dequantize`` and a resumed or lazily streamed run
    recompute it. The product runs in float64 with the butterfly (a fixed order of IEEE
    additions; the small Hadamard factor's float64 sums of float32-derived values rarely round),
    so it comes out the same wherever it runs.

    Args:
        Wr: (rows, cols) dequantized weight in the rotated basis; seed: the layer's
            :class:`HadamardRotation` seed.
    """
    if seed is None:
        return Wr
    return HadamardRotation(Wr.shape[-1], seed).inverse(Wr.double()).float()


def rotate_output(W: Tensor, rot: HadamardRotation) -> Tensor:
    """Output-side rotation ``W'' = Q W`` (``rot.n == rows``): the layer then returns ``Q y``,
    which :func:`unrotate_output` turns back into ``y`` (a bias is added after that).

    The Hessian does not change: ``tr(Q D H D^T Q^T) = tr(D H D^T)`` for any ``D = W - W_q``;
    only the rows mix, which evens out the per-row ranges of a per-OC grid."""
    return rot.apply(W.mT).mT


def unrotate_output(y: Tensor, rot: HadamardRotation) -> Tensor:
    """``Q^T y`` along the last dimension: a rotated-output layer's result in the original basis
    (also ``W = Q^T W''`` applied to the weight's columns, ``unrotate_output(W''.mT).mT``)."""
    return rot.inverse(y)

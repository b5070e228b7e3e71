"""What solving one linear layer holds in memory (the memory plan's solve term,
:mod:`baq.run.memory_estimate`), from the solver's own buffers in :mod:`baq.quant.gptq` and the
rotation of :mod:`baq.quant.rotation`; each term measured in a fresh process by
tests/run/test_memory_estimate.py."""

from __future__ import annotations


def solve_bytes(
    rows: int, cols: int, hbytes: int, method: str = "baq", rotate: bool = False
) -> int:
    """What solving one (rows, cols) linear holds beyond its weight and its Hessian (quant/).

    ``factor_hessian`` works on one copy of ``H`` in place (plus the float32 ``U`` it returns
    when ``H`` is float64); then ``U`` stays while the solver holds five float32-sized
    (rows, cols) matrices at its peak (the dead-zeroed weight, its buffers, the result's weight
    and int64 codes), three more for BAQ (its uniform measuring solve's result). RTN: no ``H``.

    ``rotate`` (``--rotate``): the solve runs on ``R H R^T`` beside the caller's ``H``, with a
    float64 weight in either basis (``quant.layer.rotated_layer``, ``original_basis``); while
    ``H`` is being rotated, the transform holds ``H R^T`` and the result
    (``quant.rotation.rotate_input``). Measured at 512 x 3072: 109 MiB for 126 (GPTQ, float32;
    up to 150 where glibc keeps freed buffers in its heap) and 202 for 204 (BAQ, float64, act
    order); 215 and 399 before the transform went by rows.
    """
    copies = (8 if method == "baq" else 5) * rows * cols * 4
    wide = 8 * rows * cols  # a float64 weight
    if method == "rtn":
        return copies + (2 * wide if rotate else 0)
    factor = cols * cols * (hbytes + (4 if hbytes == 8 else 0))
    plain = max(factor, cols * cols * 4 + copies)
    if not rotate:
        return plain
    return max(2 * cols * cols * hbytes + 2 * wide, plain + cols * cols * hbytes + 2 * wide)

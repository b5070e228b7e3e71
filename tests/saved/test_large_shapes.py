"""Sizes past 2^31 bits (issue 28 item 4): the 70B's embedding-sized head (128256 x 8192) and
down_proj (8192 x 28672) at 8 bits hold 8.4e9 and 1.9e9 bits. Offsets and byte counts must be
computed in Python ints or int64, never int32; checked on the size arithmetic and the header
checks alone (meta tensors: nothing of that size is allocated)."""

import pytest
import torch

from baq.kernels.layout import layout_nbytes, stream_bytes
from baq.saved.packing import layer_nbytes, packed_nbytes, radix_digits, read_layer

SHAPES = [(128256, 8192), (8192, 28672)]
IDS = ["70b-head", "70b-down-proj"]


@pytest.mark.parametrize("rows,cols", SHAPES, ids=IDS)
def test_byte_counts_past_2_31_bits_are_exact(rows, cols):
    n = rows * cols
    assert n * 8 > 2**30  # the premise: near or past where an int32 bit offset wraps
    assert packed_nbytes(256, n) == n  # 8 bits per code
    assert packed_nbytes(16, n) == n // 2
    k, bits = radix_digits(3)  # k base-3 digits in each b-bit value
    groups = -(-n // k)
    assert packed_nbytes(3, n) == -(-groups * bits // 8)
    levels = torch.full((cols,), 256, dtype=torch.int32)  # int32, as the file stores them
    # ranges (float16 lo and hi per row) + the classes table + the codes
    assert layer_nbytes(rows, 1, levels) == 2 * 2 * rows + 8 + n
    half = torch.cat([torch.full((cols // 2,), 16), torch.full((cols - cols // 2,), 256)])
    assert layer_nbytes(rows, 1, half.int()) == 4 * rows + 16 + rows * (cols // 2) // 2 + (
        rows * (cols - cols // 2)
    )


@pytest.mark.parametrize("rows,cols", SHAPES, ids=IDS)
def test_the_kernel_layout_counts_past_2_31_bits(rows, cols):
    n = rows * cols
    assert stream_bytes(rows, cols, 8) >= n > 2**27
    assert stream_bytes(rows, cols, 8) - n < 32  # one block's padding
    levels = torch.full((cols,), 256, dtype=torch.int32)
    assert layout_nbytes(rows, levels) == stream_bytes(rows, cols, 8)


@pytest.mark.parametrize("rows,cols", SHAPES, ids=IDS)
def test_the_header_check_takes_the_exact_stream_of_a_huge_layer(rows, cols):
    """read_layer compares a stream's byte count with the one its class table gives: right at
    8.4e9 bits it accepts, one byte short it refuses (the stream is a meta tensor)."""

    def tensors(nbytes):
        return {
            "w.level_classes": torch.tensor([[256, cols]], dtype=torch.int32),
            "w.lo": torch.full((rows, 1), -1.0, dtype=torch.float16),
            "w.hi": torch.full((rows, 1), 1.0, dtype=torch.float16),
            "w.codes.256": torch.empty(nbytes, dtype=torch.uint8, device="meta"),
        }

    packed, _, _ = read_layer("w", tensors(rows * cols), (rows, cols), 1)
    assert packed.nbytes() == 8 + rows * cols
    with pytest.raises(ValueError, match=f"has {rows * cols - 1} bytes: expected {rows * cols}"):
        read_layer("w", tensors(rows * cols - 1), (rows, cols), 1)

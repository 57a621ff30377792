"""int8 (per-row absmax) kernels, both paths, against int8.dequantize + a float64 matmul."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest

from qwen2q.kernels import triton_ops

# 197 x 75: odd K and N, a multiple of no tile.
SHAPES = (*kt.QWEN2_SHAPES, (197, 75))


@pytest.mark.parametrize("M, shape, dtype, has_bias", kt.matrix(SHAPES) + kt.big_cases())
def test_int8_linear_matches_reference(M, shape, dtype, has_bias):
    K, N = shape
    w, W = kt.reference_weight("int8", K, N)
    x, bias, out = kt.inputs(M, K, N, dtype, has_bias)
    y = triton_ops.int8_linear(x, w, bias, out=out)
    assert y is out
    kt.assert_close(y, kt.reference(x, W, bias), dtype)

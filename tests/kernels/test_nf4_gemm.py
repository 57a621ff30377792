"""NF4 (double-quantized absmax) kernels, both paths, against nf4.dequantize + a float64 matmul."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest

from qwen2q.kernels import triton_ops

# 320 x 200: whole 64-weight blocks per row, a multiple of no tile; 1000 absmax blocks leave the last
# nested block partial.
SHAPES = (*kt.QWEN2_SHAPES, (320, 200))


@pytest.mark.parametrize("M, shape, dtype, has_bias", kt.matrix(SHAPES) + kt.big_cases())
def test_nf4_linear_matches_reference(M, shape, dtype, has_bias):
    K, N = shape
    w, W = kt.reference_weight("nf4", K, N)
    x, bias, out = kt.inputs(M, K, N, dtype, has_bias)
    y = triton_ops.nf4_linear(x, w, bias, out=out)
    assert y is out
    kt.assert_close(y, kt.reference(x, W, bias), dtype)

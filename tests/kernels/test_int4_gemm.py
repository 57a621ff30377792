"""int4 (AWQ GEMM layout) kernels, both paths, against int4.dequantize + a float64 matmul."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

from qwen2q.kernels import triton_ops

# Group size per shape: 128 (AWQ's default) on the Qwen2 shapes, 32 and 64 where K allows; 320 x 200 is
# a multiple of no tile (K of 512 or 64, N of 1024 or 64).
GROUP_SIZES = {(896, 896): 128, (896, 128): 32, (896, 4864): 128, (4864, 896): 128, (320, 200): 64,
               kt.BIG_SHAPE: 128}
SHAPES = (*kt.QWEN2_SHAPES, (320, 200))


@pytest.mark.parametrize("M, shape, dtype, has_bias", kt.matrix(SHAPES) + kt.big_cases())
def test_int4_linear_matches_reference(M, shape, dtype, has_bias):
    K, N = shape
    w, W = kt.reference_weight("int4", K, N, GROUP_SIZES[shape])
    x, bias, out = kt.inputs(M, K, N, dtype, has_bias)
    y = triton_ops.int4_linear(x, w, bias, out=out)
    assert y is out
    kt.assert_close(y, kt.reference(x, W, bias), dtype)


def test_int4_linear_takes_a_prepared_native_weight_and_checks_it():
    from qwen2q.kernels import int4_native

    w, W = kt.reference_weight("int4", 896, 128, 32)
    x, bias, _ = kt.inputs(1, 896, 128, torch.float16, False)
    y = triton_ops.int4_linear(x, w, native=int4_native.from_awq(w))
    kt.assert_close(y, kt.reference(x, W, bias), x.dtype)
    other, _ = kt.reference_weight("int4", 896, 896, 128)
    with pytest.raises(ValueError, match=r"int4_linear: native is W \[896, 896\] group 128"):
        triton_ops.int4_linear(x, w, native=int4_native.from_awq(other))

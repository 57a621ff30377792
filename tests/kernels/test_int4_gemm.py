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


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_gemv_writes_y_itself_without_split_and_partials_with_it(split_k, G):
    """The M = 1 GEMV on the native layout: SPLIT_K = 1 writes y (bias included) in one launch, SPLIT_K = 3 leaves
    fp32 partials for the reduction; both match the float64 reference, and every output is written."""
    from qwen2q.kernels import int4_gemm, int4_native
    from qwen2q.kernels.tiling import Config

    K, N = 896, 192
    w, W = kt.reference_weight("int4", K, N, G)
    x, bias, out = kt.inputs(1, K, N, torch.bfloat16, True)
    config = Config(1, 64, 128, SPLIT_K=split_k, num_warps=1, num_stages=1)
    launch = int4_gemm.int4_gemv_launch(x, int4_native.from_awq(w), bias, out, config)
    assert (launch.out is out) == (split_k == 1) and launch.grid == (N // 64, split_k)
    y = int4_gemm.int4_gemv(x, int4_native.from_awq(w), bias, out, config)
    assert y is out
    kt.assert_close(y, kt.reference(x, W, bias), x.dtype)


def test_int4_linear_takes_a_prepared_native_weight_and_checks_it():
    from qwen2q.kernels import int4_native

    w, W = kt.reference_weight("int4", 896, 128, 32)
    x, bias, _ = kt.inputs(1, 896, 128, torch.float16, False)
    y = triton_ops.int4_linear(x, w, native=int4_native.from_awq(w))
    kt.assert_close(y, kt.reference(x, W, bias), x.dtype)
    other, _ = kt.reference_weight("int4", 896, 896, 128)
    with pytest.raises(ValueError, match=r"int4_linear: native is W \[896, 896\] group 128"):
        triton_ops.int4_linear(x, w, native=int4_native.from_awq(other))

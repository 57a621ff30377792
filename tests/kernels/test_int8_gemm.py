"""int8 (per-row absmax) kernels, both paths, against int8.dequantize + a float64 matmul."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_is_exact_on_extreme_codes(dtype):
    """Codes -128, -127, 0 and 127 (every sign-bit case of the flip) and x spanning 2**-10 .. 2**6: the magic
    offset 32896 * sum(x) cancels to within the output's rounding."""
    from qwen2q.kernels import int8_gemm
    from qwen2q.quantizers import int8

    K, N = 512, 128
    g = kt.generator("extreme", K, N)
    codes = torch.tensor([-128, -127, 0, 127], dtype=torch.int8)[torch.randint(0, 4, (N, K), generator=g)]
    w = int8.Int8Weight(codes.to(kt.DEVICE), torch.ones(N, device=kt.DEVICE))
    x = (torch.randn(1, K, generator=g) * 2.0 ** torch.randint(-10, 7, (1, K), generator=g)).to(dtype).to(kt.DEVICE)
    out = torch.full((1, N), float("nan"), dtype=dtype, device=kt.DEVICE)
    assert int8_gemm.gemv_applies(w)
    int8_gemm.int8_gemv(x, w, None, out)
    kt.assert_close(out, kt.reference(x, codes.double() / 127, None), dtype)

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


@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_writes_y_itself_without_split_and_partials_with_it(split_k):
    """The M = 1 GEMV: SPLIT_K = 1 writes y (bias included) in one launch, SPLIT_K = 3 leaves fp32 partials for
    the reduction; both match the float64 reference and every output is written."""
    from qwen2q.kernels import int8_gemm
    from qwen2q.kernels.tiling import Config

    K, N = 896, 256
    w, W = kt.reference_weight("int8", K, N)
    x, bias, out = kt.inputs(1, K, N, torch.bfloat16, True)
    config = Config(1, 128, int8_gemm.GEMV_BLOCK_K, SPLIT_K=split_k, num_warps=1, num_stages=1)
    launch = int8_gemm.int8_gemv_launch(x, w, bias, out, config)
    assert (launch.out is out) == (split_k == 1) and launch.grid == (N // 128, split_k)
    y = int8_gemm.int8_gemv(x, w, bias, out, config)
    assert y is out
    kt.assert_close(y, kt.reference(x, W, bias), x.dtype)


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


def test_one_row_runs_the_gemv_where_it_applies(monkeypatch):
    """int8_linear sends M = 1 to the GEMV when K is whole 32-weight blocks and N whole 128-row tiles, and to the
    split-K decode kernel otherwise (and for M > 1)."""
    from qwen2q.kernels import int8_gemm

    calls = []
    for name in ("int8_gemv", "int8_decode"):
        real = getattr(int8_gemm, name)
        monkeypatch.setattr(int8_gemm, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for M, (K, N), expected in [(1, (896, 128), "int8_gemv"), (1, (197, 75), "int8_decode"),
                                (1, (896, 200), "int8_decode"), (3, (896, 128), "int8_decode")]:
        w, W = kt.reference_weight("int8", K, N)
        x, bias, out = kt.inputs(M, K, N, torch.bfloat16, False)
        triton_ops.int8_linear(x, w, out=out)
        assert calls.pop() == expected, (M, K, N)
        kt.assert_close(out, kt.reference(x, W, bias), x.dtype)

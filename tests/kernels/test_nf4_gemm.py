"""NF4 (double-quantized absmax) kernels, both paths, against nf4.dequantize + a float64 matmul."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

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


@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_writes_y_itself_without_split_and_partials_with_it(split_k):
    """The M = 1 GEMV: SPLIT_K = 1 writes y (bias included) in one launch, SPLIT_K = 3 leaves fp32 partials for
    the reduction; both match the float64 reference and every output is written."""
    from qwen2q.kernels import nf4_gemm
    from qwen2q.kernels.tiling import Config

    K, N = 896, 256
    w, W = kt.reference_weight("nf4", K, N)
    x, bias, out = kt.inputs(1, K, N, torch.float16, True)
    config = Config(1, 128, nf4_gemm.BLOCK, SPLIT_K=split_k, num_warps=1, num_stages=1)
    launch = nf4_gemm.nf4_gemv_launch(x, w, bias, out, config)
    assert (launch.out is out) == (split_k == 1) and launch.grid == (N // 128, split_k)
    y = nf4_gemm.nf4_gemv(x, w, bias, out, config)
    assert y is out
    kt.assert_close(y, kt.reference(x, W, bias), x.dtype)


def test_one_row_runs_the_gemv_where_it_applies(monkeypatch):
    """nf4_linear sends M = 1 to the GEMV when N is whole 128-row tiles, and to the split-K decode kernel
    otherwise (and for M > 1)."""
    from qwen2q.kernels import nf4_gemm

    calls = []
    for name in ("nf4_gemv", "nf4_decode"):
        real = getattr(nf4_gemm, name)
        monkeypatch.setattr(nf4_gemm, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for M, (K, N), expected in [(1, (896, 128), "nf4_gemv"), (1, (320, 200), "nf4_decode"),
                                (3, (896, 128), "nf4_decode")]:
        w, W = kt.reference_weight("nf4", K, N)
        x, bias, out = kt.inputs(M, K, N, torch.bfloat16, False)
        triton_ops.nf4_linear(x, w, out=out)
        assert calls.pop() == expected, (M, K, N)
        kt.assert_close(out, kt.reference(x, W, bias), x.dtype)

"""The large-M choice: W^T dequantized once (each format's dequantize kernel) and a cuBLAS GEMM where
`tiling.dequantize_first` predicts it faster than the fused GEMM."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

from qwen2q.kernels import int4_gemm, int8_gemm, nf4_gemm, tiling, triton_ops
from qwen2q.quantizers import int4, int8, nf4

CASES = {"int4": ((320, 200, 64), int4_gemm, int4_gemm.int4_dequantize, int4),
         "nf4": ((320, 200), nf4_gemm, nf4_gemm.nf4_dequantize, nf4),
         "int8": ((197, 75), int8_gemm, int8_gemm.int8_dequantize, int8)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", CASES)
def test_the_dequantize_kernel_gives_the_reference_weight(fmt, dtype):
    """W^T, each weight rounded once: the reference's bits (the interpreter truncates fp32 -> bf16 where a GPU
    rounds to nearest, so there the bf16 bits may be one unit lower)."""
    args, _, dequantize, quantizer = CASES[fmt]
    w, _ = kt.reference_weight(fmt, *args)
    got, ref = dequantize(w, dtype).t(), quantizer.dequantize(w, dtype)
    if dtype == torch.float16 or not kt.INTERPRET:
        assert torch.equal(got, ref)
    else:
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-7).all()


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("fmt", CASES)
def test_the_dequantize_then_gemm_path_matches_the_reference(fmt, has_bias, monkeypatch):
    args, *_ = CASES[fmt]
    w, W = kt.reference_weight(fmt, *args)
    N, K = W.shape
    monkeypatch.setattr(tiling, "dequantize_first", lambda *a: True)
    x, bias, out = kt.inputs(33, K, N, torch.bfloat16, has_bias)
    y = getattr(triton_ops, f"{fmt}_linear")(x, w, bias, out=out)
    assert y is out
    kt.assert_close(y, kt.reference(x, W, bias), x.dtype)


@pytest.mark.parametrize("N, K", [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944), (896, 896)])
def test_the_choice_follows_the_model(N, K):
    """int8's GEMM is tensor-bound already: never dequantize.  int4 and NF4 re-dequantize every weight per
    128-row M tile: fused up to M = 256, dequantize-once at M = 2048."""
    def first(module, M):
        return tiling.dequantize_first(M, N, K, module.GEMM_SASS_PER_WEIGHT, module.PACKED_BYTES_PER_WEIGHT)

    assert not any(first(int8_gemm, M) for M in (17, 256, 2048, 8192))
    for module in (int4_gemm, nf4_gemm):
        assert not first(module, 64) and not first(module, 256) and first(module, 2048)

"""The split-K decode kernels (M = 2..16): one launch that writes y itself when SPLIT_K == 1, partials and a
fixed-order reduction otherwise."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

from qwen2q.kernels import int4_gemm, int8_gemm, nf4_gemm, splitk
from qwen2q.kernels.tiling import Config

DECODES = {"int4": ((896, 256, 64), int4_gemm.int4_decode_launch, 128),
           "nf4": ((896, 256), nf4_gemm.nf4_decode_launch, 128),
           "int8": ((896, 256), int8_gemm.int8_decode_launch, 128)}


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("fmt", DECODES)
def test_decode_writes_y_itself_without_split_and_partials_with_it(fmt, has_bias, split_k):
    args, make_launch, block_k = DECODES[fmt]
    w, W = kt.reference_weight(fmt, *args)
    N, K = W.shape
    x, bias, out = kt.inputs(5, K, N, torch.float16, has_bias)
    launch = make_launch(x, w, bias, out, Config(16, 64, block_k, SPLIT_K=split_k, num_warps=4, num_stages=1))
    assert (launch.out is out) == (split_k == 1) and launch.grid == (N // 64, split_k)
    assert splitk.finish(launch, bias, out) is out
    kt.assert_close(out, kt.reference(x, W, bias), x.dtype)

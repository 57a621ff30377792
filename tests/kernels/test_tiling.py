"""Block configs: valid tilings for every path, and the GPU configs computing correctly in the interpreter."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch
import triton

from qwen2q.kernels import int4_gemm, int8_gemm, nf4_gemm, tiling


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("k_multiple", [16, 32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("N, K", [(128, 896), (18944, 3584), (896, 4864), (75, 197), (8, 64)])
def test_decode_splits_cover_k_without_empty_programs(interpret, k_multiple, M, N, K):
    c = tiling.decode_config(M, N, K, k_multiple, interpret)
    k_per_split = tiling.decode_k_per_split(K, c)
    assert c.BLOCK_M == (1 if M == 1 else 16) and c.BLOCK_K % k_multiple == 0
    assert k_per_split % c.BLOCK_K == 0 and c.SPLIT_K >= 1
    assert (c.SPLIT_K - 1) * k_per_split < K <= c.SPLIT_K * k_per_split


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("M", [17, 33, 64, 65, 128, 4096])
def test_gemm_blocks_suit_tl_dot(interpret, M):
    c = tiling.gemm_config(M, 4864, 896, 128, interpret)
    assert c.BLOCK_M >= tiling.DOT_MIN_M and c.BLOCK_N >= 16 and c.BLOCK_K % 128 == 0


# The GPU configs (small blocks, many K steps and splits) on a shape where each program loops over K.
CASES = {
    "int4": (lambda: kt.reference_weight("int4", 4864, 136, 32), int4_gemm.int4_decode, int4_gemm.int4_gemm, 32),
    "nf4": (lambda: kt.reference_weight("nf4", 4864, 136), nf4_gemm.nf4_decode, nf4_gemm.nf4_gemm, 64),
    "int8": (lambda: kt.reference_weight("int8", 4801, 133), int8_gemm.int8_decode, int8_gemm.int8_gemm, 16),
}


@pytest.mark.parametrize("fmt", CASES)
@pytest.mark.parametrize("M", [1, 5, 40])
def test_gpu_configs_in_the_interpreter(fmt, M):
    make, decode, gemm, k_multiple = CASES[fmt]
    w, W = make()
    N, K = W.shape
    x, bias, out = kt.inputs(M, K, N, torch.bfloat16, True)
    if M <= tiling.DECODE_MAX_M:
        config = tiling.decode_config(M, N, K, k_multiple, interpret=False)
        assert config.SPLIT_K > 1 and triton.cdiv(tiling.decode_k_per_split(K, config), config.BLOCK_K) > 1
        decode(x, w, bias, out, config)
    else:
        config = tiling.gemm_config(M, N, K, k_multiple, interpret=False)
        gemm(x, w, bias, out, config)
    kt.assert_close(out, kt.reference(x, W, bias), torch.bfloat16)


@pytest.mark.parametrize("N, K", [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944), (128, 896), (29568, 8192)])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_gemv_config_fills_the_gpu_from_the_shape(N, K, fmt):
    """8 (int4) or 16 (int8) rows of one 128-bit load per thread, no tile wider than N, no split longer than K, and
    at least ~4 CTAs per SM of an H200 wherever K has enough blocks for that (at most 4096 indices per split)."""
    block_k, tiles = (128, tiling.INT4_GEMV_TILES) if fmt == "int4" else (32, tiling.INT8_GEMV_TILES)
    c = tiling.gemv_config(N, K, False, block_k, tiles)
    assert c.BLOCK_N // (8 * c.num_warps) == 8 if fmt == "int4" else c.BLOCK_N // (16 * c.num_warps) in (8, 16)
    assert c.BLOCK_N <= N and c.BLOCK_K == block_k  # a last tile may reach past N (its extra rows are not stored)
    blocks = K // block_k
    assert 1 <= c.SPLIT_K <= blocks
    n_tiles = -(-N // c.BLOCK_N)
    ctas = n_tiles * c.SPLIT_K
    assert ctas >= min(4 * 132, n_tiles * min(blocks, 32 * 128 // block_k))


def test_gemm_tiles_fit_the_shared_memory_of_the_device():
    """128-row GEMM tiles keep three stages where a block may take 163 KiB or more (sm_80, sm_90) and two where it
    may take 99 KiB (sm_86, sm_89); the report builds its launches with the limit of the architecture it
    compiles for."""
    assert tiling.gemm_config(2048, 4096, 4096, 128, False).num_stages == 3
    for arch, stages in ((80, 3), (86, 2), (89, 2), (90, 3)):
        assert tiling.gemm_config(2048, 4096, 4096, 128, False, tiling.SHARED_PER_BLOCK[arch]).num_stages == stages
    assert tiling.gemm_config(32, 4096, 4096, 128, False, tiling.SHARED_PER_BLOCK[89]).num_stages == 3  # 64 rows
    assert tiling.shared_limit(torch.device("cpu")) is None
    tiling.offline_arch = 89
    try:
        assert tiling.shared_limit(torch.device("meta")) == 99 * 1024
    finally:
        tiling.offline_arch = None

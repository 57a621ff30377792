"""int4 for 2..16 rows on the native layout (`kernels/int4_decode.py`): outputs against the float64 reference for
every group size, split and output dtype; clamped last tiles; which calls take it."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

from qwen2q.kernels import int4_decode, int4_gemm, int4_native, splitk, triton_ops
from qwen2q.kernels.tiling import Config, native_decode_config


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("M", [2, 5, 16])
@pytest.mark.parametrize("G", int4_native.GROUP_SIZES)
def test_outputs_match_the_float64_reference(G, M, split_k):
    """y (bias included, one launch) at SPLIT_K = 1, fp32 partials reduced at SPLIT_K = 3; bf16 and fp16 x; every
    output (poisoned with NaN) written."""
    K, N = 896, 128
    w, W = kt.reference_weight("int4", K, N, G)
    dtype = (torch.bfloat16, torch.float16)[(M + split_k) % 2]
    x, bias, out = kt.inputs(M, K, N, dtype, M != 5)
    launch = int4_decode.int4_native_decode_launch(x, int4_native.from_awq(w), bias, out,
                                                   Config(16, 64, 128, SPLIT_K=split_k, num_warps=1))
    assert (launch.out is out) == (split_k == 1) and launch.grid == (N // 64, split_k)
    assert splitk.finish(launch, bias, out) is out
    kt.assert_close(out, kt.reference(x, W, bias), dtype)


def test_a_last_tile_past_n_stores_nothing_past_n():
    """N = 80 with 64-row tiles: the second program reloads row 79 for its 48 extra rows and stores none of them."""
    K, N, M = 384, 80, 4
    w, W = kt.reference_weight("int4", K, N, 64)
    x, bias, _ = kt.inputs(M, K, N, torch.bfloat16, True)
    buffer = torch.full((M, N + 48), float("nan"), dtype=torch.bfloat16, device=kt.DEVICE)
    out = buffer[:, :N]
    for split_k in (1, 2):
        launch = int4_decode.int4_native_decode_launch(x, int4_native.from_awq(w), bias, out,
                                                       Config(16, 64, 128, SPLIT_K=split_k, num_warps=1))
        assert launch.grid == (2, split_k)
        splitk.finish(launch, bias, out)
        kt.assert_close(out, kt.reference(x, W, bias), x.dtype)
        assert torch.isnan(buffer[:, N:]).all()


def test_calls_it_cannot_run_are_refused():
    w = int4_native.from_awq(kt.reference_weight("int4", 256, 64, 128)[0])
    for M, stride in ((1, None), (17, None), (4, 2)):
        x = torch.zeros(M, 256 * (stride or 1), dtype=torch.bfloat16)[:, ::stride or 1]
        with pytest.raises(ValueError, match="cannot run the int4 native decode"):
            int4_decode.int4_native_decode_launch(x, w, None, torch.empty(M, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("N, K", [(18944, 3584), (3584, 18944), (512, 3584), (29568, 8192)])
def test_config_fills_the_gpu_without_empty_splits(N, K):
    """On a GPU: 64-row tiles, one warp, and enough splits for ~4 programs per SM (at most one per block)."""
    c = native_decode_config(N, K, interpret=False)
    assert (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps) == (16, 64, 128, 1)
    tiles = -(-N // 64)
    assert 1 <= c.SPLIT_K <= K // 128
    assert tiles * c.SPLIT_K >= min(4 * 132, tiles * (K // 128)) or c.SPLIT_K == 32


def test_two_to_sixteen_rows_run_it_when_the_native_layout_is_there(monkeypatch):
    """The op: M = 1 -> the GEMV, M = 2..16 -> this kernel, M = 17 -> the GEMM path, all from one weight; without
    the native layout, M = 2..16 takes the AWQ-layout decode kernel."""
    calls = []
    for module, name in ((int4_gemm, "int4_gemv"), (int4_decode, "int4_native_decode"), (int4_gemm, "int4_decode"),
                         (int4_gemm, "int4_gemm")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    K, N = 256, 64
    w, W = kt.reference_weight("int4", K, N, 128)
    native = int4_native.from_awq(w)
    for M, with_native, path in ((1, True, "int4_gemv"), (2, True, "int4_native_decode"),
                                 (16, True, "int4_native_decode"), (17, True, "int4_gemm"), (3, False, "int4_decode")):
        x, bias, out = kt.inputs(M, K, N, torch.bfloat16, True)
        triton_ops.int4_linear(x, w, bias, out=out, native=native if with_native else None)
        assert calls.pop() == path, (M, with_native)
        kt.assert_close(out, kt.reference(x, W, bias), x.dtype)

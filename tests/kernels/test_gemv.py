"""The M = 1 GEMVs of every format (`kernels/gemv.py` and each format's kernel): the split and the output the
kernel writes, and which calls take them, against the float64 reference."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

from qwen2q.kernels import gemv, int4_gemm, int4_native, int8_gemm, nf4_gemm, triton_ops
from qwen2q.kernels.tiling import Config

# format: (weight arguments after K, N; block of K one iteration reads; the GEMV's launch builder taking the
# weight the runtime passes it)
def _int4_gemv_launch(x, w, *args):
    return int4_gemm.int4_gemv_launch(x, int4_native.from_awq(w), *args)


GEMVS = {
    **{f"int4-g{g}": ("int4", (g,), int4_native.BLOCK_K, _int4_gemv_launch) for g in int4_native.GROUP_SIZES},
    "int8": ("int8", (), int8_gemm.GEMV_BLOCK_K, int8_gemm.int8_gemv_launch),
    "nf4": ("nf4", (), nf4_gemm.BLOCK, nf4_gemm.nf4_gemv_launch),
}


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("name", GEMVS)
def test_gemv_writes_y_itself_without_split_and_partials_with_it(name, split_k):
    """SPLIT_K = 1 writes y (bias included) in one launch, SPLIT_K = 3 leaves fp32 partials for the reduction;
    both match the float64 reference and every output (poisoned with NaN) is written."""
    fmt, extra, block_k, make_launch = GEMVS[name]
    K, N = 896, 256
    w, W = kt.reference_weight(fmt, K, N, *extra)
    x, bias, out = kt.inputs(1, K, N, (torch.bfloat16, torch.float16)[split_k % 2], True)
    config = Config(1, 128, block_k, SPLIT_K=split_k, num_warps=1, num_stages=1)
    launch = make_launch(x, w, bias, out, config)
    assert (launch.out is out) == (split_k == 1) and launch.grid == (N // 128, split_k)
    assert gemv.finish(launch, bias, out) is out
    kt.assert_close(out, kt.reference(x, W, bias), x.dtype)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("name", GEMVS)
def test_the_fixup_writes_y_in_the_kernel_with_the_reductions_bits(name, has_bias, monkeypatch):
    """With splitk.FIXUP the split launch itself writes y, bit for bit what the partials and `splitk.reduce` give (the
    same fp32 sum order), and leaves its tiles' counters at zero, so the next launch (a graph replay) finishes too."""
    from qwen2q.kernels import splitk

    fmt, extra, block_k, make_launch = GEMVS[name]
    K, N = 896, 256
    w, _ = kt.reference_weight(fmt, K, N, *extra)
    x, bias, out = kt.inputs(1, K, N, torch.bfloat16, has_bias)
    config = Config(1, 128, block_k, SPLIT_K=3, num_warps=1, num_stages=1)
    reduced = gemv.finish(make_launch(x, w, bias, out.clone(), config), bias, out.clone())
    monkeypatch.setattr(splitk, "FIXUP", True)
    launch = make_launch(x, w, bias, out, config)
    assert launch.out is out and launch.kwargs["FIXUP"] and launch.grid == (2, 3)
    for _ in range(2):
        out.fill_(float("nan"))
        assert gemv.finish(launch, bias, out) is out
        assert torch.equal(out, reduced)
        assert splitk._COUNTERS[out.device][:2].eq(0).all()


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_one_row_runs_the_gemv_where_it_applies(monkeypatch, fmt):
    """The op sends M = 1 to the GEMV when N is whole 128-row tiles (and, for int8, K whole 32-weight blocks), and
    to the split-K decode kernel otherwise and for M > 1."""
    module = {"int8": int8_gemm, "nf4": nf4_gemm}[fmt]
    calls = []
    for name in (f"{fmt}_gemv", f"{fmt}_decode"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    cases = [(1, (896, 128), "gemv"), (1, (320, 200), "decode"), (3, (896, 128), "decode")]
    if fmt == "int8":
        cases.append((1, (200, 128), "decode"))  # K not whole 32-weight blocks
    for M, (K, N), path in cases:
        w, W = kt.reference_weight(fmt, K, N)
        x, bias, out = kt.inputs(M, K, N, torch.bfloat16, False)
        getattr(triton_ops, f"{fmt}_linear")(x, w, out=out)
        assert calls.pop() == f"{fmt}_{path}", (M, K, N)
        kt.assert_close(out, kt.reference(x, W, bias), x.dtype)


@pytest.mark.parametrize("name, N, block_n", [("int4-g128", 192, 128), ("int8", 384, 256), ("nf4", 384, 256)])
def test_a_last_tile_past_n_loads_clamped_rows_and_stores_nothing_past_n(name, N, block_n):
    """N a multiple of the narrow tile only (as 72B's gate/up, 29568 rows, is of 128 and not 256): the last program
    reloads row N - 1 for its extra rows and stores none of them; the elements just past y stay untouched."""
    fmt, extra, block_k, make_launch = GEMVS[name]
    K = 896
    w, W = kt.reference_weight(fmt, K, N, *extra)
    x, bias, _ = kt.inputs(1, K, N, torch.bfloat16, True)
    buffer = torch.full((1, N + 64), float("nan"), dtype=torch.bfloat16, device=kt.DEVICE)
    out = buffer[:, :N]
    for split_k in (1, 2):
        launch = make_launch(x, w, bias, out, Config(1, block_n, block_k, SPLIT_K=split_k, num_warps=1, num_stages=1))
        assert launch.grid[0] == -(-N // block_n)
        assert gemv.finish(launch, bias, out) is out
        kt.assert_close(out, kt.reference(x, W, bias), x.dtype)
        assert torch.isnan(buffer[:, N:]).all()

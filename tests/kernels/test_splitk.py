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


def _int4_native_decode_launch(x, w, bias, out, config):
    from qwen2q.kernels import int4_decode, int4_native

    return int4_decode.int4_native_decode_launch(x, int4_native.from_awq(w), bias, out, config)


# fmt: (weight args, launch builder, M, Config): the decode skeleton of every format, and int4_decode with two
# M tiles and two N tiles (four counters).
FIXUP_CASES = {**{fmt: (args, make, 5, Config(16, 64, block_k, SPLIT_K=3, num_warps=4, num_stages=1))
                  for fmt, (args, make, block_k) in DECODES.items()},
               "int4-native": ((896, 128, 64), _int4_native_decode_launch, 20,
                               Config(16, 64, 128, SPLIT_K=3, num_warps=1))}


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("case", FIXUP_CASES)
def test_the_fixup_writes_y_in_the_kernel_with_the_reductions_bits(case, has_bias, monkeypatch):
    """With splitk.FIXUP a split decode launch writes y itself, bit for bit what its partials and `reduce` give, and
    leaves every counter at zero, so that the next launch (a graph replay) finishes too."""
    args, make_launch, M, config = FIXUP_CASES[case]
    w, _ = kt.reference_weight(case.partition("-")[0], *args)
    K, N = args[0], args[1]
    x, bias, out = kt.inputs(M, K, N, torch.bfloat16, has_bias)
    reduced = splitk.finish(make_launch(x, w, bias, out.clone(), config), bias, out.clone())
    monkeypatch.setattr(splitk, "FIXUP", True)
    launch = make_launch(x, w, bias, out, config)
    assert launch.out is out and launch.kwargs["FIXUP"]
    for _ in range(2):
        out.fill_(float("nan"))
        assert splitk.finish(launch, bias, out) is out
        assert torch.equal(out, reduced)
        assert splitk._COUNTERS[out.device].eq(0).all()


def test_a_counter_buffer_a_larger_one_replaces_is_kept_alive(monkeypatch):
    """Graphs captured with the fix-up point at the buffer: outgrowing it must not free it."""
    monkeypatch.setattr(splitk, "_COUNTERS", {})
    monkeypatch.setattr(splitk, "_OUTGROWN", [])
    small = splitk.counters(torch.device("cpu"), 10)
    assert small.numel() == 1024 and not small.any() and splitk.counters(torch.device("cpu"), 1024) is small
    large = splitk.counters(torch.device("cpu"), 2000)
    assert large.numel() == 2000 and splitk._OUTGROWN == [small]

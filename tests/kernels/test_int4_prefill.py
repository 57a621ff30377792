"""int4 on the native layout alone: the dequantize kernel of calls past int4_decode.MAX_M rows, and
`triton_ops.int4_linear` given only the layout a module on CUDA holds (every M: the GEMV, the tensor-core kernel,
dequantize + cuBLAS), against int4.dequantize of the AWQ weight it was made from and a float64 matmul."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

from qwen2q.kernels import int4_decode, int4_native, int4_prefill, triton_ops
from qwen2q.quantizers import int4

# (K, N, G): every group size; N = 200 ends in a partial 64-row tile.
SHAPES = [(384, 200, 32), (896, 128, 64), (256, 320, 128)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K, N, G", SHAPES)
def test_the_native_dequantize_gives_the_awq_weights_values(K, N, G, dtype):
    """W [N, K], each weight rounded once: int4.dequantize's bits (the interpreter truncates fp32 -> bf16 where a
    GPU rounds to nearest, so there bf16 may be one unit lower)."""
    w = kt.random_int4(K, N, G)
    got, ref = int4_prefill.dequantize(int4_native.from_awq(w), dtype), int4.dequantize(w, dtype)
    assert got.shape == (N, K) and got.dtype == dtype
    if dtype == torch.float16 or not kt.INTERPRET:
        assert torch.equal(got, ref)
    else:
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-7).all()


def test_the_native_dequantize_refuses_what_it_cannot_write():
    native = int4_native.from_awq(kt.random_int4(256, 64, 128))
    with pytest.raises(ValueError, match=r"int4 native dequantize: W \[64, 256\] group 128 to torch.float32"
                                         r" \[64, 256\]: needs bf16"):
        int4_prefill.dequantize(native, torch.float32)


@pytest.mark.parametrize("M", [1, 5, 300, int4_decode.MAX_M + 1])
@pytest.mark.parametrize("K, N, G", SHAPES)
def test_int4_linear_runs_on_the_native_layout_alone(M, K, N, G):
    w = kt.random_int4(K, N, G)
    W = int4.dequantize(w, torch.float32)
    dtype = (torch.bfloat16, torch.float16)[M % 2]
    x, bias, out = kt.inputs(M, K, N, dtype, has_bias=M != 5)
    y = triton_ops.int4_linear(x, None, bias, out=out, native=int4_native.from_awq(w))
    assert y is out
    kt.assert_close(y, kt.reference(x, W, bias), dtype)


def test_more_than_max_m_rows_dequantize_the_native_layout_once(monkeypatch):
    """Past int4_decode.MAX_M the native layout is dequantized (not the AWQ tensors, which are not even read:
    here they are given wrong on purpose) and multiplied by cuBLAS, a strided x included."""
    w = kt.random_int4(256, 320, 128)
    native = int4_native.from_awq(w)
    calls = []
    real = int4_prefill.dequantize
    monkeypatch.setattr(int4_prefill, "dequantize", lambda *a: calls.append(a) or real(*a))
    x = kt.inputs(int4_decode.MAX_M + 3, 512, 320, torch.bfloat16, False)[0][:, ::2]  # K stride 2
    other = kt.random_int4(256, 320, 128, seed=1)
    y = triton_ops.int4_linear(x, other, native=native)
    assert len(calls) == 1 and calls[0][0] is native
    kt.assert_close(y, kt.reference(x, int4.dequantize(w, torch.float32), None), torch.bfloat16)


def test_int4_linear_needs_a_weight_and_checks_the_native_one():
    x = torch.zeros(3, 256, dtype=torch.bfloat16, device=kt.DEVICE)
    with pytest.raises(ValueError, match="int4_linear: give the weight in AWQ's layout, in the native layout, or"):
        triton_ops.int4_linear(x, None)
    native = int4_native.from_awq(kt.random_int4(256, 64, 128))
    bad = int4_native.Int4Native(native.words, native.zeros.to(torch.int32), native.scales)
    with pytest.raises(ValueError, match=r"int4_linear: native zeros must be torch.uint8 \[2, 64\], got torch.int32"):
        triton_ops.int4_linear(x, None, native=bad)
    with pytest.raises(ValueError, match=r"int4_linear: x has shape \[3, 128\]; its last dim must equal the weight's"
                                         r" in_features=256"):
        triton_ops.int4_linear(x[:, :128], None, native=native)

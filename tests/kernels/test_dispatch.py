"""qwen2q.kernels picks the Triton ops for bf16/fp16 CUDA activations, the reference otherwise."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import dataclasses

import pytest
import torch

from qwen2q import kernels
from qwen2q.quantizers import int4

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_activations_take_the_reference():
    assert kernels.backend(torch.zeros(1, 8, dtype=torch.bfloat16)) == "reference"


def test_unknown_backend_choice_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="QWEN2Q_KERNELS='fast'; use 'auto' or 'reference'"):
        kernels.backend(torch.zeros(1, 8))


@needs_cuda
@pytest.mark.parametrize("dtype, choice, expected", [
    (torch.bfloat16, "auto", "triton"), (torch.float16, "auto", "triton"),
    (torch.float32, "auto", "reference"), (torch.bfloat16, "reference", "reference"),
])
def test_cuda_backend(monkeypatch, dtype, choice, expected):
    monkeypatch.setenv(kernels.ENV, choice)
    assert kernels.backend(torch.zeros(1, 8, dtype=dtype, device="cuda")) == expected


@needs_cuda
def test_cuda_dispatch_matches_the_reference(monkeypatch):
    w = kt.random_int4(256, 64, 128)
    w = dataclasses.replace(w, **{name: getattr(w, name).cuda() for name in ("qweight", "qzeros", "scales")})
    x = torch.randn(3, 256, dtype=torch.bfloat16, device="cuda")
    ref = kt.reference(x, int4.dequantize(w, torch.float32), None)
    kt.assert_close(kernels.int4_linear(x, w), ref, torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "reference")
    kt.assert_close(kernels.int4_linear(x, w), ref, torch.bfloat16)


@needs_cuda
def test_an_int4_weight_on_cuda_is_prepared_in_the_gemv_layout_and_one_row_runs_it():
    from qwen2q.kernels import int4_native
    from qwen2q.quantizers import registry

    fmt = registry.get("awq-gemm")
    w = kt.random_int4(896, 896, 128)
    w = int4.Int4Weight(w.qweight.cuda(), w.qzeros.cuda(), w.scales.cuda())
    prepared = kernels.prepare(fmt, w, torch.bfloat16)
    assert isinstance(prepared, int4_native.Int4Native) and prepared.words.is_cuda
    x = torch.randn(1, 896, dtype=torch.bfloat16, device="cuda")
    ref = kt.reference(x, int4.dequantize(w, torch.float32), None)
    kt.assert_close(kernels.linear(fmt, x, w, None, prepared), ref, torch.bfloat16)


def test_a_gemv_prepared_weight_never_sends_cpu_activations_to_the_cpu_backend():
    from qwen2q.kernels import int4_native
    from qwen2q.quantizers import registry

    w = kt.random_int4(896, 128, 32)
    prepared = int4_native.from_awq(w)
    x = torch.randn(1, 896, generator=kt.generator("dispatch-x"), dtype=torch.float32).to(torch.bfloat16)
    assert kernels.backend(x, prepared) == "reference"
    y = kernels.linear(registry.get("awq-gemm"), x, w, None, prepared)
    assert torch.equal(y, torch.nn.functional.linear(x, int4.dequantize(w, torch.bfloat16)))

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

"""The public wrappers: input checks and their messages, leading dims and strides, bf16 range, determinism."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import contextlib
import dataclasses

import pytest
import torch

from qwen2q.kernels import tiling, triton_ops

K, N = 128, 64
BF16, FP16 = torch.bfloat16, torch.float16


def small_weight(fmt):
    return {"int4": lambda: kt.random_int4(K, N, 32), "nf4": lambda: kt.random_nf4(K, N),
            "int8": lambda: kt.random_int8(K, N)}[fmt]()


def op(fmt):
    return getattr(triton_ops, f"{fmt}_linear")


FORMATS = ("int4", "nf4", "int8")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 3, 33])
def test_bf16_beyond_fp16_range(fmt, M):
    """x ~ 1e6 and outputs far above fp16's 65504: finite and accurate, so bf16 never passes through fp16."""
    w, W = kt.reference_weight(fmt, *((K, N, 32) if fmt == "int4" else (K, N)))
    x, bias, out = kt.inputs(M, K, N, BF16, True)
    x, bias = x * 2.0**20, bias * 2.0**20
    y = op(fmt)(x, w, bias, out=out)
    assert y.abs().max() > 1e5
    kt.assert_close(y, kt.reference(x, W, bias), BF16)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lead", [(2, 3), (3, 11)], ids=["decode", "gemm"])
def test_leading_dims_strided_x_and_new_output(fmt, lead):
    """x [..., K] as a non-contiguous view (strides reach the kernels), no `out`: y [..., N] is allocated."""
    w, W = kt.reference_weight(fmt, *((K, N, 32) if fmt == "int4" else (K, N)))
    rows = lead[0] * lead[1]
    base = torch.randn(K, rows, generator=kt.generator("strided", rows)).to(FP16).to(kt.DEVICE)
    x = base.t().reshape(*lead, K)  # element (r, k) at k * rows + r: stride 1 along rows, `rows` along K
    assert x.stride(-1) == rows
    y = op(fmt)(x, w)
    assert y.shape == (*lead, N) and y.dtype == FP16
    kt.assert_close(y.reshape(rows, N), kt.reference(x.reshape(rows, K), W, None), FP16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_is_deterministic(fmt):
    """The split-K partials are summed in a fixed order: two runs agree bit for bit."""
    w = small_weight(fmt)
    x, bias, _ = kt.inputs(5, K, N, BF16, True)
    assert torch.equal(op(fmt)(x, w, bias), op(fmt)(x, w, bias))


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_batch(fmt):
    x = torch.empty(0, 7, K, dtype=FP16, device=kt.DEVICE)
    assert op(fmt)(x, small_weight(fmt)).shape == (0, 7, N)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x, message", [
    (lambda: torch.randn(2, K), "x must be a bfloat16 or float16 tensor, got torch.float32"),
    (lambda: torch.randn(2, K + 8).to(BF16), rf"last dim must equal the weight's in_features={K}"),
    (lambda: torch.randn(()).to(BF16), "last dim must equal"),
], ids=["fp32", "wrong-K", "scalar"])
def test_rejects_bad_x(fmt, x, message):
    with pytest.raises(ValueError, match=message):
        op(fmt)(x().to(kt.DEVICE), small_weight(fmt))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias, message", [
    (lambda: torch.randn(N + 1).to(BF16), rf"bias must be torch.bfloat16 \[{N}\], got torch.bfloat16 \[{N + 1}\]"),
    (lambda: torch.randn(N).to(FP16), rf"bias must be torch.bfloat16 \[{N}\], got torch.float16"),
], ids=["shape", "dtype"])
def test_rejects_bad_bias(fmt, bias, message):
    x = torch.randn(2, K).to(BF16).to(kt.DEVICE)
    with pytest.raises(ValueError, match=message):
        op(fmt)(x, small_weight(fmt), bias().to(kt.DEVICE))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out, message", [
    (lambda: torch.empty(2, N + 1, dtype=BF16), rf"out must be a contiguous torch.bfloat16 \[2, {N}\] tensor, got"),
    (lambda: torch.empty(2, N, dtype=FP16), "got torch.float16"),
    (lambda: torch.empty(N, 2, dtype=BF16).t(), r"\(not contiguous\)"),
], ids=["shape", "dtype", "strided"])
def test_rejects_bad_out(fmt, out, message):
    x = torch.randn(2, K).to(BF16).to(kt.DEVICE)
    with pytest.raises(ValueError, match=message):
        op(fmt)(x, small_weight(fmt), out=out().to(kt.DEVICE))


@pytest.mark.parametrize("fmt", FORMATS)
def test_rejects_tensors_on_another_device(fmt):
    w = small_weight(fmt)
    x = torch.empty(2, K, dtype=BF16, device="meta")
    with pytest.raises(ValueError, match=rf"{fmt}_linear: \w+ is on {kt.DEVICE.type}.* but x is on meta"):
        op(fmt)(x, w)


@pytest.mark.skipif(not kt.INTERPRET, reason="CPU tensors are only refused outside the interpreter")
def test_rejects_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="x is on cpu; the Triton kernels need CUDA tensors"):
        triton_ops.int8_linear(torch.randn(2, K).to(BF16), small_weight("int8"))


@pytest.mark.parametrize("fmt, field, value, message", [
    ("int4", "scales", lambda w: w.scales.float(), r"scales must be torch.float16 \[4, 64\], got torch.float32"),
    ("int4", "qzeros", lambda w: w.qzeros[:, :4], r"qzeros must be torch.int32 \[4, 8\], got torch.int32 \[4, 4\]"),
    ("int4", "scales", lambda w: w.scales[:3], "in_features=128 is not a multiple of the 3 scale groups"),
    ("int4", "scales", lambda w: w.scales.repeat(2, 1), "int4_linear: group_size=16 is not supported"),
    ("nf4", "absmax", lambda w: w.absmax.float(), r"absmax must be torch.uint8 \[128\], got torch.float32"),
    ("nf4", "packed", lambda w: w.packed[:-1], r"packed must be torch.uint8 \[4096, 1\]"),
    ("nf4", "shape", lambda w: (64, 96), "in_features=96 is not a multiple of 64"),
    ("int8", "qweight", lambda w: w.qweight.short(), r"qweight must be torch.int8 \[64, 128\], got torch.int16"),
    ("int8", "absmax", lambda w: w.absmax[:-1], r"absmax must be torch.float32 \[64\], got torch.float32 \[63\]"),
], ids=["int4-scales-dtype", "int4-qzeros-shape", "int4-groups", "int4-group-size", "nf4-absmax-dtype",
        "nf4-packed-shape", "nf4-unaligned-K", "int8-qweight-dtype", "int8-absmax-shape"])
def test_rejects_bad_weights(fmt, field, value, message):
    w = small_weight(fmt)
    w = dataclasses.replace(w, **{field: value(w)})
    x = torch.randn(2, K if fmt != "nf4" or field != "shape" else 96).to(BF16).to(kt.DEVICE)
    with pytest.raises(ValueError, match=message):
        op(fmt)(x, w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_strides_past_int32_offsets_however_few_elements(fmt):
    """Two rows of x, 2**31 elements apart: few elements, but an offset the kernels' int32 indexing cannot form.
    Meta tensors: the check runs before any launch."""
    w = small_weight(fmt)
    w = dataclasses.replace(w, **{f.name: getattr(w, f.name).to("meta") for f in dataclasses.fields(w)
                                  if isinstance(getattr(w, f.name), torch.Tensor)})
    x = torch.empty(2, K, dtype=BF16, device="meta").as_strided((2, K), (2**31, 1))
    with pytest.raises(ValueError, match=rf"{fmt}_linear: .* x reaches element offset {2**31 + K - 1}, past"):
        op(fmt)(x, w)


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    """Kernels launch on the current CUDA device: a tensor on cuda:1 while cuda:0 is current gets a guard that
    switches to cuda:1; the current device itself, and the CPU, get none."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    triton_ops.device_guard(torch.device("cuda:1"))
    assert entered == [torch.device("cuda:1")]
    for device in (torch.device("cuda:0"), torch.device("cpu"), torch.device("meta")):
        assert isinstance(triton_ops.device_guard(device), contextlib.nullcontext)
    assert entered == [torch.device("cuda:1")]

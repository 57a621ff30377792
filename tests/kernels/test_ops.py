"""The Triton matmuls as torch.library ops: what kernels dispatch to, what torch.compile traces, and the error a
broken Triton install gives instead of a silent slow path."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

from qwen2q import kernels
from qwen2q.kernels import ops, triton_ops  # noqa: F401  (ops registers torch.ops.qwen2q.*)

K, N = 256, 128


def _call(fmt, x, w, bias):
    if fmt == "int4":
        return torch.ops.qwen2q.int4_linear(x, w.qweight, w.qzeros, w.scales, bias, None, None)
    if fmt == "nf4":
        return torch.ops.qwen2q.nf4_linear(x, w.packed, w.absmax, w.nested_absmax, w.offset, *w.shape, bias)
    return torch.ops.qwen2q.int8_linear(x, w.qweight, w.absmax, bias)


def _weight(fmt):
    return kt.reference_weight(fmt, *((K, N, 64) if fmt == "int4" else (K, N)))


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
@pytest.mark.parametrize("M", [1, 3])
def test_the_op_runs_the_triton_function(fmt, M):
    w, W = _weight(fmt)
    x, bias, _ = kt.inputs(M, K, N, torch.bfloat16, True)
    y = _call(fmt, x, w, bias)
    assert torch.equal(y, getattr(triton_ops, f"{fmt}_linear")(x, w, bias))
    kt.assert_close(y, kt.reference(x, W, bias), x.dtype)


@pytest.mark.parametrize("M", [1, 3, 300])
def test_the_int4_op_runs_on_the_native_layout_alone(M):
    """What a module on CUDA passes: no AWQ tensors, the GEMV layout and the scales it shares; traced whole too."""
    from qwen2q.kernels import int4_native

    w, W = _weight("int4")
    native = int4_native.from_awq(w)
    x, bias, _ = kt.inputs(M, K, N, torch.float16, M != 3)

    def f(x):
        return torch.ops.qwen2q.int4_linear(x, None, None, native.scales, bias, native.words, native.zeros)

    y = f(x)
    kt.assert_close(y, kt.reference(x, W, bias), x.dtype)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), y)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_torch_compile_traces_the_op_whole(fmt):
    """fullgraph=True: the op is one node (its fake implementation gives the shape), no graph break; the compiled
    function gives the eager result."""
    w, _ = _weight(fmt)
    x, bias, _ = kt.inputs(2, K, N, torch.bfloat16, True)

    def f(x):
        return torch.relu(_call(fmt, x * 2, w, bias))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


def test_fake_tensors_give_the_output_shape_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, _ = _weight("int8")
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.qwen2q.int8_linear(torch.empty(4, 7, K, dtype=torch.float16), w.qweight, w.absmax, None)
    assert y.shape == (4, 7, N) and y.dtype == torch.float16


def test_a_triton_that_cannot_be_imported_is_an_error_not_a_slow_path(monkeypatch):
    """On CUDA activations the Triton backend is required: an import failure names itself and the remedy."""
    import sys

    import qwen2q.kernels as package

    monkeypatch.delattr(package, "triton_ops")
    monkeypatch.setitem(sys.modules, "qwen2q.kernels.triton_ops", None)  # `import` raises ImportError
    kernels._triton_ops.cache_clear()  # an import that succeeded earlier in this process is remembered
    with pytest.raises(kernels.KernelsUnavailable, match="the Triton kernels cannot be imported .*QWEN2Q_KERNELS="
                                                         "reference"):
        kernels.choose_backend(torch.device("cuda", 0), torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "reference")  # the user's way around it
    assert kernels.choose_backend(torch.device("cuda", 0), torch.bfloat16) == "reference"
    monkeypatch.delenv(kernels.ENV)
    assert kernels.choose_backend(torch.device("cpu"), torch.float32) == "reference"  # CPU never needs Triton
    monkeypatch.undo()
    kernels._triton_ops.cache_clear()

"""The one dispatch point for quantized matmuls: y = x @ W^T + b with W stored quantized.

Each op takes activations x [..., K] (bf16, fp16 or fp32), a quantized weight object from
`qwen2q.quantizers` describing W [N, K], and an optional bias [N]; it returns y [..., N] in x's dtype.
Three backends, chosen once per module when it is prepared at load (`choose_backend`, passed back as `kind`),
or per call (`backend`) by a caller that passes none:

- "triton": bf16 and fp16 activations on CUDA run the Triton kernels (`triton_ops`), through the custom ops
  `torch.ops.qwen2q.*` (`ops`) so that torch.compile and CUDA graphs take them; a Triton that cannot be imported
  is an error (`KernelsUnavailable`), not a silent fall-back;
- "cpu": bf16 activations on CPU run the CPU backend (`cpu`), from the weight's *prepared* form, made once
  when the model is loaded (`prepare`) and passed to `linear` beside the weight; on CUDA the prepared form of
  an int4 weight is its GEMV layout (`int4_native`), which every int4 call runs on and which a module holds
  instead of AWQ's qweight and qzeros (`replaces`, `restore`);
- "reference" everywhere else, or with QWEN2Q_KERNELS=reference: dequantize W to x's dtype, then
  `torch.nn.functional.linear`.  It is the oracle the other two are tested against.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F

from qwen2q.errors import Qwen2qError
from qwen2q.kernels import cpu, int4_native
from qwen2q.kernels.cpu import Workspace, aligned
from qwen2q.quantizers import int4, int8, nf4

ENV = "QWEN2Q_KERNELS"  # "auto" (default) or "reference"
CPU_CACHES = cpu.CACHES  # what `prepare(cache=...)` may keep besides None


def backend(x: torch.Tensor, prepared=None) -> str:
    """'triton', 'cpu' or 'reference' for activations `x` and the weight's prepared form (None: none); see
    `choose_backend`."""
    return choose_backend(x.device, x.dtype, prepared)


def choose_backend(device: torch.device, dtype: torch.dtype, prepared=None) -> str:
    """The backend for activations of `dtype` on `device` (a module calls this once, when it is prepared): the
    Triton kernels take bf16 and fp16 CUDA activations, the CPU backend bf16 CPU activations with a prepared
    weight, the reference the rest or with QWEN2Q_KERNELS=reference.  Raises `KernelsUnavailable` when the
    Triton kernels should run but cannot be imported: a broken install is reported, not run slowly."""
    choice = os.environ.get(ENV, "auto").lower()
    if choice not in ("auto", "reference"):
        raise ValueError(f"{ENV}={choice!r}; use 'auto' or 'reference'")
    if choice == "reference":
        return "reference"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        _triton_ops()
        return "triton"
    if prepared is not None and not isinstance(prepared, int4_native.Int4Native) and device.type == "cpu" \
            and dtype == cpu.DTYPE:
        return "cpu"
    return "reference"


def prepare(fmt, w, dtype: torch.dtype, cache: str | None = None, workspace: Workspace | None = None):
    """The load-time form of weight object `w` in format `fmt`, for a model running in `dtype`, or None where it
    has none.  On CUDA: an int4 weight's GEMV layout (`int4_native.Int4Native`) when the Triton kernels are
    installed and the shape has it.  On CPU: the CPU backend's form (None when `dtype` is not bf16 or the
    backend does not take the format or shape).

    cache "bf16" keeps a bf16 copy of W (2 bytes per weight, for any format); None prepares the format's own
    CPU op.  `workspace` holds the scratch buffers, shared by one model's linears (default: a new one)."""
    if cache is not None and cache not in CPU_CACHES:
        raise ValueError(f"cache={cache!r}; use None or one of {CPU_CACHES}")
    tensors = [t for t in vars(w).values() if isinstance(t, torch.Tensor)]
    if tensors and all(t.is_cuda for t in tensors):
        if fmt.kernel == "int4_linear" and choose_backend(tensors[0].device, dtype) == "triton" \
                and _triton_ops().gemv_applies(w):
            return int4_native.from_awq(w)
        return None
    if dtype != cpu.DTYPE or any(t.device.type != "cpu" for t in tensors):
        return None
    return cpu.prepare(fmt.kernel, w, fmt.dequantize, cache, workspace if workspace is not None else Workspace())


class KernelsUnavailable(Qwen2qError):
    """The Triton kernels should run (bf16 or fp16 activations on CUDA) but cannot be imported."""


@functools.cache  # the quantized linears' hot path calls it on every Triton call; a failure is not cached
def _triton_ops():
    """The Triton implementations (qwen2q.kernels.triton_ops), with their ops registered (`ops`); raises
    KernelsUnavailable naming the import error."""
    try:
        from qwen2q.kernels import ops, triton_ops  # noqa: F401  (ops: registers torch.ops.qwen2q.*)
    except ImportError as e:
        raise KernelsUnavailable(f"the Triton kernels cannot be imported ({type(e).__name__}: {e}); install the"
                                 f" triton that matches torch, or set {ENV}=reference to run the slow reference"
                                 " path") from e
    return triton_ops


def nf4_linear(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None = None, kind: str | None = None
               ) -> torch.Tensor:
    # The kernel needs whole 64-weight absmax blocks per row, as every Qwen2 projection has.
    if (kind or backend(x)) == "triton" and w.shape[1] % nf4.BLOCK_SIZE == 0:
        _triton_ops()
        return torch.ops.qwen2q.nf4_linear(x, w.packed, w.absmax, w.nested_absmax, w.offset, *w.shape, bias)
    return F.linear(x, nf4.dequantize(w, x.dtype), bias)


def int8_linear(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None = None, kind: str | None = None
                ) -> torch.Tensor:
    if (kind or backend(x)) == "triton":
        _triton_ops()
        return torch.ops.qwen2q.int8_linear(x, w.qweight, w.absmax, bias)
    return F.linear(x, int8.dequantize(w, x.dtype), bias)


def int4_linear(x: torch.Tensor, w: int4.Int4Weight | None, bias: torch.Tensor | None = None,
                native: int4_native.Int4Native | None = None, kind: str | None = None) -> torch.Tensor:
    """w: AWQ's layout, or None where only `native` (the GEMV layout) is held."""
    if (kind or backend(x)) == "triton":
        _triton_ops()
        words, zeros = (native.words, native.zeros) if native is not None else (None, None)
        qweight, qzeros, scales = (w.qweight, w.qzeros, w.scales) if w is not None else (None, None, native.scales)
        return torch.ops.qwen2q.int4_linear(x, qweight, qzeros, scales, bias, words, zeros)
    dense = int4.dequantize(w, x.dtype) if w is not None else int4_native.dequantize(native, x.dtype)
    return F.linear(x, dense, bias)


def linear(fmt, x: torch.Tensor, w, bias: torch.Tensor | None = None, prepared=None, kind: str | None = None
           ) -> torch.Tensor:
    """y = x @ W^T + b for a weight object `w` of any registered format `fmt`, or w None where the caller holds only
    `prepared` in its place (`replaces`).  kind: the backend a module chose when it was prepared
    (`choose_backend`), or None to choose now.  The CPU backend runs from `prepared` (from `prepare`); the Triton
    kernels through the format's op above (named by `fmt.kernel`), with an int4 weight's GEMV layout when
    `prepared` is one; otherwise the reference (dequantize to x's dtype, then linear)."""
    kind = kind or backend(x, prepared)
    if kind == "cpu":
        return prepared.linear(x, bias)
    op = getattr(sys.modules[__name__], fmt.kernel, None) if fmt.kernel else None
    if op is None:
        return F.linear(x, fmt.dequantize(w if w is not None else restore(prepared), x.dtype), bias)
    if isinstance(prepared, int4_native.Int4Native):
        native = prepared if w is None or prepared.words.device == x.device else None
        return op(x, w, bias, native=native, kind=kind)
    return op(x, w if w is not None else restore(prepared), bias, kind=kind)


def replaces(prepared) -> tuple[str, ...]:
    """The tensor fields of the weight object that `prepared` (from `prepare`) holds in another form, so that a
    module may free them while it holds `prepared` and rebuild them with `restore`: an int4 weight's GEMV layout
    replaces AWQ's qweight and qzeros (every Triton path for int4 reads it; it shares the scales); the CPU
    backend's forms replace nothing."""
    return ("qweight", "qzeros") if isinstance(prepared, int4_native.Int4Native) else ()


def restore(prepared):
    """The weight object `prepared` was made from, rebuilt bit for bit on its device (for a `replaces` form)."""
    if not isinstance(prepared, int4_native.Int4Native):
        raise ValueError(f"{type(prepared).__name__} does not hold a weight in place of its checkpoint tensors")
    return int4_native.to_awq(prepared)

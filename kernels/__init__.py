"""The one dispatch point for quantized matmuls: y = x @ W^T + b with W stored quantized.

Each op takes activations x [..., K] (bf16, fp16 or fp32), a quantized weight object from
`qwen2q.quantizers` describing W [N, K], and an optional bias [N]; it returns y [..., N] in x's dtype.
Three backends, chosen per call by `backend`:

- "triton": bf16 and fp16 activations on CUDA run the Triton kernels (`triton_ops`);
- "cpu": bf16 activations on CPU run the CPU backend (`cpu`), from the weight's *prepared* form, made once
  when the model is loaded (`prepare`) and passed to `linear` beside the weight; on CUDA the prepared form of
  an int4 weight is its GEMV layout (`int4_native`), which one-row calls run on;
- "reference" everywhere else, or with QWEN2Q_KERNELS=reference: dequantize W to x's dtype, then
  `torch.nn.functional.linear`.  It is the oracle the other two are tested against.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from qwen2q.kernels import cpu, int4_native
from qwen2q.kernels.cpu import Workspace, aligned
from qwen2q.quantizers import int4, int8, nf4

ENV = "QWEN2Q_KERNELS"  # "auto" (default) or "reference"
CPU_CACHES = cpu.CACHES  # what `prepare(cache=...)` may keep besides None


def backend(x: torch.Tensor, prepared=None) -> str:
    """'triton', 'cpu' or 'reference' for activations `x` and the weight's prepared form (None: none):
    the Triton kernels take bf16 and fp16 CUDA activations, the CPU backend bf16 CPU activations."""
    choice = os.environ.get(ENV, "auto").lower()
    if choice not in ("auto", "reference"):
        raise ValueError(f"{ENV}={choice!r}; use 'auto' or 'reference'")
    if choice == "reference":
        return "reference"
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return "triton" if _triton_ops() is not None else "reference"
    if prepared is not None and not isinstance(prepared, int4_native.Int4Native) and x.device.type == "cpu" \
            and x.dtype == cpu.DTYPE:
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
        ops = _triton_ops()
        if fmt.kernel == "int4_linear" and ops is not None and ops.gemv_applies(w):
            return int4_native.from_awq(w)
        return None
    if dtype != cpu.DTYPE or any(t.device.type != "cpu" for t in tensors):
        return None
    return cpu.prepare(fmt.kernel, w, fmt.dequantize, cache, workspace if workspace is not None else Workspace())


def _triton_ops():
    """The Triton implementations, once they exist (qwen2q.kernels.triton_ops); None otherwise."""
    try:
        from qwen2q.kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


def nf4_linear(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    # The kernel needs whole 64-weight absmax blocks per row, as every Qwen2 projection has.
    if backend(x) == "triton" and w.shape[1] % nf4.BLOCK_SIZE == 0:
        return _triton_ops().nf4_linear(x, w, bias)
    return F.linear(x, nf4.dequantize(w, x.dtype), bias)


def int8_linear(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if backend(x) == "triton":
        return _triton_ops().int8_linear(x, w, bias)
    return F.linear(x, int8.dequantize(w, x.dtype), bias)


def int4_linear(x: torch.Tensor, w: int4.Int4Weight, bias: torch.Tensor | None = None,
                native: int4_native.Int4Native | None = None) -> torch.Tensor:
    if backend(x) == "triton":
        return _triton_ops().int4_linear(x, w, bias, native=native)
    return F.linear(x, int4.dequantize(w, x.dtype), bias)


def linear(fmt, x: torch.Tensor, w, bias: torch.Tensor | None = None, prepared=None) -> torch.Tensor:
    """y = x @ W^T + b for a weight object `w` of any registered format `fmt`: the CPU backend when `prepared`
    (from `prepare`) serves x, else the format's own op above (named by `fmt.kernel`) when it has one, else the
    reference (dequantize to x's dtype, then linear)."""
    if isinstance(prepared, int4_native.Int4Native):
        return int4_linear(x, w, bias, native=prepared if prepared.words.device == x.device else None)
    if prepared is not None and backend(x, prepared) == "cpu":
        return prepared.linear(x, bias)
    op = getattr(sys.modules[__name__], fmt.kernel, None) if fmt.kernel else None
    if op is not None:
        return op(x, w, bias)
    return F.linear(x, fmt.dequantize(w, x.dtype), bias)

"""The one dispatch point for quantized matmuls: y = x @ W^T + b with W stored quantized.

Each op takes activations x [..., K] (bf16, fp16 or fp32), a quantized weight object from
`qwen2q.quantizers` describing W [N, K], and an optional bias [N]; it returns y [..., N] in x's dtype.
On CUDA the Triton kernels (`triton_ops`) run for bf16 and fp16 activations; everywhere else, or with
QWEN2Q_KERNELS=reference, the plain-PyTorch reference runs: dequantize W to x's dtype, then
`torch.nn.functional.linear`.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from qwen2q.quantizers import int4, int8, nf4

ENV = "QWEN2Q_KERNELS"  # "auto" (default) or "reference"


def backend(x: torch.Tensor) -> str:
    """'triton' or 'reference' for activations `x`; the kernels take bf16 and fp16 CUDA activations."""
    choice = os.environ.get(ENV, "auto").lower()
    if choice not in ("auto", "reference"):
        raise ValueError(f"{ENV}={choice!r}; use 'auto' or 'reference'")
    if choice == "reference" or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return "reference"
    return "triton" if _triton_ops() is not None else "reference"


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


def int4_linear(x: torch.Tensor, w: int4.Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if backend(x) == "triton":
        return _triton_ops().int4_linear(x, w, bias)
    return F.linear(x, int4.dequantize(w, x.dtype), bias)


def linear(fmt, x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b for a weight object `w` of any registered format `fmt`: the format's own op above
    (named by `fmt.kernel`) when it has one, else the reference (dequantize to x's dtype, then linear)."""
    op = getattr(sys.modules[__name__], fmt.kernel, None) if fmt.kernel else None
    if op is not None:
        return op(x, w, bias)
    return F.linear(x, fmt.dequantize(w, x.dtype), bias)

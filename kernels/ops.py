"""The Triton matmuls as PyTorch custom ops (`torch.library`): torch.ops.qwen2q.{int4,nf4,int8}_linear.

Registered ops are opaque to `torch.compile` (a fake implementation gives the output's shape and dtype without
running anything, so tracing needs no GPU and causes no graph break) and are captured by CUDA graphs like any op.
Each takes the weight object's tensors and plain fields as arguments and returns y [..., N] in x's dtype; the
implementation is `triton_ops`' function of the same name (its checks and messages included).  `qwen2q.kernels`
calls these when a module's backend is "triton".

Registering needs only torch; `triton_ops` (and so triton) is imported on the first call.
"""
from __future__ import annotations

import torch

from qwen2q.quantizers import int4, int8, nf4


def _triton_ops():
    from qwen2q.kernels import triton_ops

    return triton_ops


def _y_like(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("qwen2q::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor | None, qzeros: torch.Tensor | None, scales: torch.Tensor,
                bias: torch.Tensor | None, native_words: torch.Tensor | None,
                native_zeros: torch.Tensor | None) -> torch.Tensor:
    """AWQ int4 (qweight int32 [K, N / 8], qzeros int32 [K / G, N / 8], scales fp16 [K / G, N]), or None where a
    module holds only the GEMV layout; native_words and native_zeros: that layout (`int4_native`), or None."""
    from qwen2q.kernels import int4_native

    native = None if native_words is None else int4_native.Int4Native(native_words, native_zeros, scales)
    w = None if qweight is None else int4.Int4Weight(qweight, qzeros, scales)
    return _triton_ops().int4_linear(x, w, bias, native=native)


@int4_linear.register_fake
def _(x, qweight, qzeros, scales, bias, native_words, native_zeros):
    return _y_like(x, scales.shape[1])


@torch.library.custom_op("qwen2q::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor,
               offset: float, out_features: int, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """bitsandbytes NF4 with double-quantized absmax (`nf4.NF4Weight`'s tensors, offset and shape)."""
    w = nf4.NF4Weight(packed, absmax, nested_absmax, offset, (out_features, in_features), x.dtype)
    return _triton_ops().nf4_linear(x, w, bias)


@nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, offset, out_features, in_features, bias):
    return _y_like(x, out_features)


@torch.library.custom_op("qwen2q::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Per-row int8 (qweight int8 [N, K], absmax fp32 [N])."""
    return _triton_ops().int8_linear(x, int8.Int8Weight(qweight, absmax), bias)


@int8_linear.register_fake
def _(x, qweight, absmax, bias):
    return _y_like(x, qweight.shape[0])

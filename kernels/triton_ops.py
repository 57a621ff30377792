"""Triton implementations of the ops `qwen2q.kernels` dispatches: y = x @ W^T + b with W stored quantized.

Contract (each op): x bf16 or fp16 [..., K] (any leading dims); w a weight object from
`qwen2q.quantizers` describing W [N, K]; bias None or [N] in x's dtype; out None or a contiguous
[..., N] tensor in x's dtype to write into. Returns y [..., N] in x's dtype, accumulated in fp32 with
the bias added before the single rounding to x's dtype; bf16 is never cast through fp16.

M = the number of rows of x picks the path (see `tiling`): M = 1 the GEMVs where the shape takes them,
M <= 16 the split-K decode kernels, larger M the tl.dot GEMM kernels or, where `tiling.dequantize_first`
predicts it faster, W^T dequantized once and a cuBLAS GEMM.  An int4 weight in the GEMV's layout
(`int4_native`) has paths of its own for every M (`int4_linear`).  Bad input raises ValueError naming the value
and what would be valid.  The kernels need CUDA tensors, or CPU tensors under the Triton interpreter (TRITON_INTERPRET=1
before triton is imported), which the tests use.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from qwen2q.kernels import int4_decode, int4_gemm, int4_native, int4_prefill, int8_gemm, nf4_gemm, tiling
from qwen2q.quantizers import int4, int8, nf4

_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
_MAX_INDEX = 2**31  # kernels index weights and activations with int32 offsets


def _check_device(op: str, x: torch.Tensor, tensors: dict[str, torch.Tensor | None]) -> None:
    """Every tensor on x's device (checked first, so the message is the same with and without a GPU), and that
    device one the kernels run on."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move both to one device")
    if not x.is_cuda and not tiling.interpreting():
        raise ValueError(f"{op}: x is on {x.device}; the Triton kernels need CUDA tensors"
                         " (or TRITON_INTERPRET=1 for the CPU interpreter)")


def _largest_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel computes into t: sum over dims of (size - 1) * stride."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def device_guard(device: torch.device):
    """A context that makes `device` the current CUDA device while kernels launch (Triton launches on the current
    device, so tensors on cuda:1 with cuda:0 current would be read from the wrong GPU); a no-op when it already
    is, or off CUDA."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _check_tensor(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")


def _gemm_or_dequantize(module, gemm: Callable, dequantize: Callable) -> Callable:
    """The M > 16 path of a format `module`: its fused GEMM, or its dequantize-once and a cuBLAS GEMM where
    `tiling.dequantize_first` predicts that faster."""
    def run(x2, w, bias, out):
        (M, K), N = x2.shape, out.shape[1]
        if not tiling.dequantize_first(M, N, K, module.GEMM_SASS_PER_WEIGHT, module.PACKED_BYTES_PER_WEIGHT):
            return gemm(x2, w, bias, out)
        wt = dequantize(w, x2.dtype)  # W^T [K, N], freed when the product is done
        return torch.addmm(bias, x2, wt, out=out) if bias is not None else torch.mm(x2, wt, out=out)
    return run


def _gemv_or_decode(applies: Callable, gemv: Callable, decode: Callable) -> Callable:
    """The M <= 16 path of a format whose GEMV reads the checkpoint's tensors: the GEMV for one row where
    `applies(w)`, else the split-K decode kernel."""
    def run(x2, w, bias, out):
        if x2.shape[0] == 1 and applies(w):
            return gemv(x2.contiguous(), w, bias, out)
        return decode(x2, w, bias, out)
    return run


def _run(op: str, x: torch.Tensor, w, N: int, K: int, weights: dict[str, torch.Tensor], bias: torch.Tensor | None,
         out: torch.Tensor | None, decode: Callable, gemm: Callable) -> torch.Tensor:
    """Check x, bias and out against W [N, K], flatten x to [M, K], launch `decode` (M <= 16) or `gemm`."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _ACTIVATION_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a bfloat16 or float16 tensor, got {got}"
                         " (float32 activations take the reference path)")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"{op}: x has shape {list(x.shape)}; its last dim must equal the weight's in_features={K}")
    _check_device(op, x, {**weights, "bias": bias, "out": out})
    if bias is not None:
        _check_tensor(op, "bias", bias, x.dtype, (N,))
    out_shape = (*x.shape[:-1], N)
    if out is not None and (out.dtype != x.dtype or tuple(out.shape) != out_shape or not out.is_contiguous()):
        raise ValueError(f"{op}: out must be a contiguous {x.dtype} {list(out_shape)} tensor, got"
                         f" {out.dtype} {list(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    # Kernels index with int32: every offset they form must stay below 2**31, whatever the strides.
    offsets = {"W": N * K, "x": _largest_offset(x), "y": math.prod(out_shape),
               **{name: _largest_offset(t) for name, t in weights.items()}}
    if out is not None:
        offsets["out"] = _largest_offset(out)
    if (name := max(offsets, key=offsets.get)) and offsets[name] >= _MAX_INDEX:
        raise ValueError(f"{op}: W [{N}, {K}], x {list(x.shape)} stride {list(x.stride())}: {name} reaches element"
                         f" offset {offsets[name]}, past the kernels' int32 indexing (2**31); split the call")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0:
        return out
    bias = bias.contiguous() if bias is not None else None
    with device_guard(x.device):
        (decode if tiling.is_decode(M) else gemm)(x2, w, bias, out.view(M, N))
    return out


def gemv_applies(w: int4.Int4Weight) -> bool:
    """True when the int4 M = 1 GEMV takes W (K in whole 128-index blocks, groups of 32, 64 or 128, N in whole
    64-row tiles); other shapes run the split-K decode kernel at M = 1 too."""
    return int4_native.supports(w.in_features, w.group_size) and w.out_features % 64 == 0


def _check_native(op: str, native: int4_native.Int4Native) -> tuple[int, int, int]:
    """(N, K, G) of a weight in the GEMV's layout, after checking its tensors (`int4_native`'s docstring)."""
    words, zeros, scales = native.words, native.zeros, native.scales
    if words.dim() != 2 or scales.dim() != 2 or scales.shape[0] == 0 or words.shape[1] * 8 % scales.shape[0]:
        raise ValueError(f"{op}: native words int32 [N, K / 8] and scales fp16 [K / G, N] do not fit: got"
                         f" {list(words.shape)} and {list(scales.shape)}")
    N, K, G = native.out_features, native.in_features, native.group_size
    if not int4_native.supports(K, G):
        raise ValueError(f"{op}: native W [{N}, {K}] group {G}: the layout needs in_features % {int4_native.BLOCK_K}"
                         f" == 0 and a group size in {int4_native.GROUP_SIZES}")
    _check_tensor(op, "native words", words, torch.int32, (N, K // 8))
    _check_tensor(op, "native zeros", zeros, torch.uint8, (K // G, N))
    _check_tensor(op, "scales", scales, torch.float16, (K // G, N))
    if any(t.stride(1) != 1 for t in (words, zeros, scales)):
        raise ValueError(f"{op}: native words, zeros and scales must have contiguous rows")
    return N, K, G


def int4_linear(x: torch.Tensor, w: int4.Int4Weight | None, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, native: int4_native.Int4Native | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for an int4 weight given in AWQ's GEMM layout `w` (qweight int32 [K, N/8], qzeros int32
    [K/G, N/8], scales fp16 [K/G, N]), in the GEMV's layout `native` (`int4_native`, made once at load time by
    `qwen2q.kernels.prepare`; a module on CUDA holds only this one), or both.  With `native`, every M runs on it:
    one row of x the GEMV, 2..512 rows `int4_decode`'s tensor-core kernel, more rows `int4_prefill` (dequantize
    once + cuBLAS), and `w` is not read.  Without it, the split-K decode kernel (M <= 16) and the GEMM paths."""
    op = "int4_linear"
    if w is None and native is None:
        raise ValueError(f"{op}: give the weight in AWQ's layout, in the native layout, or both")
    weights: dict[str, torch.Tensor] = {}
    if w is not None:
        if w.qweight.dim() != 2 or w.scales.dim() != 2 or w.scales.shape[0] == 0:
            raise ValueError(f"{op}: qweight and scales must be non-empty 2-D tensors, got {list(w.qweight.shape)}"
                             f" and {list(w.scales.shape)}")
        K, N = w.in_features, w.out_features
        groups = w.scales.shape[0]
        if K % groups:
            raise ValueError(f"{op}: in_features={K} is not a multiple of the {groups} scale groups")
        try:
            int4.check_shape(K, N, K // groups)
        except ValueError as e:
            raise ValueError(f"{op}: {e}") from None
        _check_tensor(op, "qweight", w.qweight, torch.int32, (K, N // int4.PACK_FACTOR))
        _check_tensor(op, "qzeros", w.qzeros, torch.int32, (groups, N // int4.PACK_FACTOR))
        _check_tensor(op, "scales", w.scales, torch.float16, (groups, N))
        weights = {"qweight": w.qweight, "qzeros": w.qzeros, "scales": w.scales}
    if native is not None:
        N_, K_, G_ = _check_native(op, native)
        if w is not None and (N_, K_, G_, native.words.device) != (N, K, w.group_size, w.qweight.device):
            raise ValueError(f"{op}: native is W [{N_}, {K_}] group {G_} on {native.words.device}; the weight is"
                             f" W [{N}, {K}] group {w.group_size} on {w.qweight.device}")
        N, K = N_, K_
        weights.update({"native words": native.words, "native zeros": native.zeros, "scales": native.scales})

    def native_path(x2, w, bias, out, other):
        if native is None:
            return other(x2, w, bias, out)
        if x2.shape[0] == 1:
            return int4_gemm.int4_gemv(x2.contiguous(), native, bias, out)
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        if int4_decode.applies(x2.shape[0]):
            return int4_decode.int4_native_decode(x2, native, bias, out)
        return int4_prefill.int4_native_linear(x2, native, bias, out)

    gemm = _gemm_or_dequantize(int4_gemm, int4_gemm.int4_gemm, int4_gemm.int4_dequantize)
    return _run(op, x, w, N, K, weights, bias, out, lambda *a: native_path(*a, int4_gemm.int4_decode),
                lambda *a: native_path(*a, gemm))


def nf4_linear(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a bitsandbytes NF4 weight with double-quantized absmax; needs K % 64 == 0.  One row
    of x runs the GEMV where it applies (`nf4_gemm.gemv_applies`), other M and shapes the split-K decode or GEMM
    kernel."""
    op = "nf4_linear"
    N, K = w.shape
    if K % nf4.BLOCK_SIZE:
        raise ValueError(f"{op}: in_features={K} is not a multiple of {nf4.BLOCK_SIZE}; the kernel needs whole"
                         " 64-weight absmax blocks per row (use the reference path: QWEN2Q_KERNELS=reference)")
    blocks = N * K // nf4.BLOCK_SIZE
    _check_tensor(op, "packed", w.packed, torch.uint8, (N * K // 2, 1))
    _check_tensor(op, "absmax", w.absmax, torch.uint8, (blocks,))
    _check_tensor(op, "nested_absmax", w.nested_absmax, torch.float32, (-(-blocks // nf4.NESTED_BLOCK_SIZE),))
    weights = {"packed": w.packed, "absmax": w.absmax, "nested_absmax": w.nested_absmax}
    if not all(t.is_contiguous() for t in weights.values()):
        raise ValueError(f"{op}: packed, absmax and nested_absmax must be contiguous")
    return _run(op, x, w, N, K, weights, bias, out, _gemv_or_decode(nf4_gemm.gemv_applies, nf4_gemm.nf4_gemv,
                                                                     nf4_gemm.nf4_decode),
                _gemm_or_dequantize(nf4_gemm, nf4_gemm.nf4_gemm, nf4_gemm.nf4_dequantize))


def int8_linear(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a per-row int8 weight (qweight int8 [N, K], absmax fp32 [N]).  One row of x runs the
    GEMV where it applies (`int8_gemm.gemv_applies`), other M and shapes the split-K decode or GEMM kernel."""
    op = "int8_linear"
    if w.qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be int8 [out_features, in_features], got {list(w.qweight.shape)}")
    N, K = w.qweight.shape
    _check_tensor(op, "qweight", w.qweight, torch.int8, (N, K))
    _check_tensor(op, "absmax", w.absmax, torch.float32, (N,))
    if not w.absmax.is_contiguous():
        raise ValueError(f"{op}: absmax must be contiguous")
    weights = {"qweight": w.qweight, "absmax": w.absmax}
    return _run(op, x, w, N, K, weights, bias, out, _gemv_or_decode(int8_gemm.gemv_applies, int8_gemm.int8_gemv,
                                                                     int8_gemm.int8_decode),
                _gemm_or_dequantize(int8_gemm, int8_gemm.int8_gemm, int8_gemm.int8_dequantize))

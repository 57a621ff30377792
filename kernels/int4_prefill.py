"""int4 for more than 512 rows of x (`int4_decode.MAX_M`) on the GEMV's native layout (`int4_native`): W
dequantized once, then cuBLAS.

At these M a cuBLAS GEMM is tensor-bound and the one-off dequantize (0.52 bytes per weight read, 2 written) is
a small part of the call (7B gate/up at M = 2048: 40 of 321 us by the report's model), so the native layout
needs no GEMM of its own: this module writes W [N, K] in x's dtype (nn.Linear's own layout, which cuBLAS takes
transposed as it is) and multiplies.  With it every int4 path reads the native layout, and a module on CUDA
keeps no AWQ copy.

Each program dequantizes BLOCK_N rows of one 128-index block: 16 native words per row (4 x 128-bit loads), code j
of word c is W[n, 128 b + 16 j + c], read as the GEMV reads it (`int4_gemm._code_value`: MAGIC_j + q exactly in
fp32), then (q - zero) * scale, exact in fp32, rounded once to the output dtype: the values of `int4.dequantize`
bit for bit.  The temporary lives for the one call (2 bytes per weight).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2q.kernels import int4_native
from qwen2q.kernels.int4_decode import _magic
from qwen2q.kernels.int4_gemm import _FIELDS, _code_value
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import Config

BLOCK_N = 64  # rows of W per program: 64 x 16 words = 4 KB read, 16 KB written (bf16)
NUM_WARPS = 4


@triton.jit
def int4_native_dequantize_kernel(
    # Pointers: words, zeros, scales in int4_native's layout; out: W [N, K] in the output dtype
    words_ptr, zeros_ptr, scales_ptr, out_ptr,
    # Sizes; strides (of the first dim of each)
    N, stride_wn, stride_zg, stride_sg, stride_on,
    # Code field masks (int4_gemm._FIELDS)
    FIELD_11, FIELD_15, FIELD_19,
    # Meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """W[n, 128 b + k] for the program's BLOCK_N rows n and its block b = program_id(1), k = 0..127."""
    pid_n, b = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1)  # a last tile past N reloads row N - 1 and stores none of it
    offs_c = tl.arange(0, 16)
    w = tl.load(words_ptr + rows[:, None] * stride_wn + b * 16 + offs_c[None, :]).to(tl.uint32, bitcast=True)
    v1 = (w >> 12) | (w << 20)
    v2 = w << 8
    CODES_PER_GROUP: tl.constexpr = GROUP_SIZE // 16
    for g in tl.static_range(8 // CODES_PER_GROUP):
        group = b * (128 // GROUP_SIZE) + g
        scale = tl.load(scales_ptr + group * stride_sg + rows).to(tl.float32)
        zero = tl.load(zeros_ptr + group * stride_zg + rows).to(tl.float32)
        for i in tl.static_range(CODES_PER_GROUP):
            j = g * CODES_PER_GROUP + i
            q = _code_value(w, v1, v2, j, FIELD_11, FIELD_15, FIELD_19) - _magic(j)  # exact
            value = (q - zero[:, None]) * scale[:, None]  # exact: |q - zero| <= 15 times an fp16 scale
            tl.store(out_ptr + offs_n[:, None] * stride_on + b * 128 + 16 * j + offs_c[None, :],
                     value.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def dequantize_launch(w: int4_native.Int4Native, out: torch.Tensor) -> Launch:
    """The launch that writes W [N, K] into `out` (bf16 or fp16, rows contiguous): grid (N / BLOCK_N, K / 128)."""
    N, K, G = w.out_features, w.in_features, w.group_size
    if out.dtype not in (torch.bfloat16, torch.float16) or not int4_native.supports(K, G) \
            or tuple(out.shape) != (N, K) or out.stride(1) != 1:
        raise ValueError(f"int4 native dequantize: W [{N}, {K}] group {G} to {out.dtype} {list(out.shape)}: needs"
                         f" bf16 or fp16 [N, K] with contiguous rows, K % {int4_native.BLOCK_K} == 0 and groups of"
                         f" {int4_native.GROUP_SIZES}")
    grid = (triton.cdiv(N, BLOCK_N), K // int4_native.BLOCK_K)
    args = (w.words, w.zeros, w.scales, out, N, w.words.stride(0), w.zeros.stride(0), w.scales.stride(0),
            out.stride(0), *_FIELDS)
    kwargs = dict(GROUP_SIZE=G, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=1)
    return Launch(int4_native_dequantize_kernel, grid, args, kwargs, Config(1, BLOCK_N, int4_native.BLOCK_K), out)


def dequantize(w: int4_native.Int4Native, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` (bf16 or fp16): (q - zero) * scale rounded once, `int4.dequantize`'s values."""
    out = torch.empty((w.out_features, w.in_features), dtype=dtype, device=w.words.device)
    launch = dequantize_launch(w, out)
    return launch() if out.numel() else out


def int4_native_linear(x: torch.Tensor, w: int4_native.Int4Native, bias: torch.Tensor | None,
                       out: torch.Tensor) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T + bias: W dequantized to x's dtype once, then one cuBLAS GEMM (any M; the
    runtime takes it for M > `int4_decode.MAX_M`)."""
    wd = dequantize(w, x.dtype)  # freed when the product is done
    return torch.addmm(bias, x, wd.t(), out=out) if bias is not None else torch.mm(x, wd.t(), out=out)

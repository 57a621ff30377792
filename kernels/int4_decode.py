"""int4 for 2..16 rows of x: tensor cores on the GEMV's native layout (`int4_native`), y = x @ W^T + bias.

The split-K decode kernel (`skeletons.decode_kernel` with `int4_gemm.int4_tile`) reads AWQ's layout, turns
every weight into fp32 with a shift, a mask, an int-to-float conversion, a subtraction and a multiply, and
sends the tile through shared memory into `tl.dot`: ~10 SASS instructions per weight on sm_90, issue-bound at
~0.37 of the copy bandwidth (kernels/NOTES.md).  This kernel reads the layout the M = 1 GEMV already reads
and computes W x^T (W the left operand, the <= 16 rows of x the right one), so the dequantized weights are
the MMA's A fragments and stay in registers:

    v      = bits(word view & FIELD | EXPONENT)          MAGIC_j + q, one LOP3 (`int4_gemm._code_value`: the
                                                         GEMV's three views, 2 shifts per 8 codes)
    w      = fma(v, scale, -(MAGIC_j + zero) * scale)   exactly (q - zero) * scale: both products fit fp32's
                                                         24 bits (13-bit magic + q, 11-bit fp16 scale)
    W^T    = bf16(w)                                     rounded once: the reference's bits (`int4.dequantize`)

so a weight costs 1 LOP3 + 1 FFMA + 1/2 F2FP + 1/4 shift, and the MMA 1/4 (16 rows of x) on one warp.  Per
128-index block b, code j of the 16 words of a row covers k = 128 b + 16 j + c (c = 0..15): eight K = 16 dots
of W [BLOCK_N, 16] with x^T [16, BLOCK_M].  One warp per program (BLOCK_N rows): more warps made Triton move
each dequantized tile through shared memory (STS, LDS, barriers) or, at four warps, pick wgmma with its fences.

Rows are clamped as in the GEMV (`gemv.program`): a last tile past N reloads row N - 1 and stores nothing
there.  SPLIT_K = 1 writes y (bias included); otherwise fp32 partials [SPLIT_K, M, N] for `splitk.reduce`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2q.kernels import gemv, int4_native, splitk
from qwen2q.kernels.int4_gemm import _FIELDS, _code_value
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import DECODE_MAX_M, DOT_MIN_M, Config, dot_dtype, interpreting, native_decode_config


@triton.jit
def _magic(J: tl.constexpr):
    """MAGIC_j, the value code j reads as with q = 0 (int4_native.MAGICS)."""
    if J % 3 == 0:
        return 4096.0
    elif J % 3 == 1:
        return 256.0
    else:
        return 16.0


@triton.jit
def int4_native_decode_kernel(
    # Pointers: x [M, K] (K contiguous); words, zeros, scales: int4_native's layout; bias [N] or None;
    # out: y [M, N] in x's dtype when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    x_ptr, words_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr,
    # Sizes; each program reduces BLOCKS_PER_SPLIT 128-index blocks
    M, N, BLOCKS_PER_SPLIT, TOTAL_BLOCKS,
    # Strides (out: of its split and row dims)
    stride_xm, stride_wn, stride_zg, stride_sg, stride_os, stride_om,
    # Code field masks (int4_gemm._FIELDS)
    FIELD_11, FIELD_15, FIELD_19,
    # Meta-parameters
    GROUP_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """acc [BLOCK_N, BLOCK_M] = W x^T over the program's blocks; then y = acc^T (+ bias) or its partials."""
    pid_k, first, last, offs_n, rows = gemv.program(BLOCKS_PER_SPLIT, TOTAL_BLOCKS, N, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_c = tl.arange(0, 16)
    w_ptrs = words_ptr + rows[:, None] * stride_wn + offs_c[None, :]
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_c[:, None]  # x^T [16, BLOCK_M]: k = c, rows m
    GROUPS_PER_BLOCK: tl.constexpr = 128 // GROUP_SIZE
    CODES_PER_GROUP: tl.constexpr = GROUP_SIZE // 16
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for b in range(first, last):
        w = tl.load(w_ptrs + b * 16).to(tl.uint32, bitcast=True)
        for g in tl.static_range(GROUPS_PER_BLOCK):
            group = b * GROUPS_PER_BLOCK + g
            scale = tl.load(scales_ptr + group * stride_sg + rows).to(tl.float32)
            zero = tl.load(zeros_ptr + group * stride_zg + rows).to(tl.float32)
            for i in tl.static_range(CODES_PER_GROUP):
                j = g * CODES_PER_GROUP + i
                # The views are recomputed per code (CSE merges them): computed once outside, Triton chose
                # a dot layout that needs warp shuffles for every tile.
                v = _code_value(w, (w >> 12) | (w << 20), w << 8, j, FIELD_11, FIELD_15, FIELD_19)
                wt = v * scale[:, None] - ((_magic(j) + zero) * scale)[:, None]
                # Upcast right after the load: the interpreter computes bf16 arithmetic wrongly.
                xt = tl.load(xt_ptrs + b * 128 + 16 * j, mask=m_mask[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(wt.to(DOT_DTYPE), xt.to(DOT_DTYPE), acc)
    n_mask = offs_n < N
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None], acc, mask=mask)


def applies(M: int) -> bool:
    """True for the rows of x this kernel takes (2..16); one row runs the GEMV, more the GEMM paths."""
    return 2 <= M <= DECODE_MAX_M


def int4_native_decode_launch(x: torch.Tensor, w: int4_native.Int4Native, bias: torch.Tensor | None,
                              out: torch.Tensor, config: Config | None = None) -> Launch:
    """The launch for x [M, K] (M = 2..16, K contiguous): grid (N / BLOCK_N, SPLIT_K); it writes out [M, N] itself
    when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N] (Launch.out) for `splitk.reduce`."""
    (M, K), N, G = x.shape, w.out_features, w.group_size
    config = config or native_decode_config(N, K, interpreting())
    if not applies(M) or K != w.in_features or x.stride(1) != 1 or config.BLOCK_M != DOT_MIN_M \
            or config.BLOCK_K != int4_native.BLOCK_K or not int4_native.supports(K, G):
        raise ValueError(f"{config} cannot run the int4 native decode on x {list(x.shape)} stride"
                         f" {list(x.stride())} and W [{N}, {w.in_features}], group {G}")
    blocks = K // int4_native.BLOCK_K
    per_split = triton.cdiv(blocks, config.SPLIT_K)
    split_k = triton.cdiv(blocks, per_split)  # no split left empty
    written, (stride_os, stride_om, _) = splitk.target(split_k, out)
    grid = (triton.cdiv(N, config.BLOCK_N), split_k)
    args = (x, w.words, w.zeros, w.scales, bias, written,
            M, N, per_split, blocks,
            x.stride(0), w.words.stride(0), w.zeros.stride(0), w.scales.stride(0), stride_os, stride_om,
            *_FIELDS)
    kwargs = dict(GROUP_SIZE=G, DOT_DTYPE=dot_dtype(x), HAS_BIAS=bias is not None, SPLIT_K=split_k,
                  BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(int4_native_decode_kernel, grid, args, kwargs, config, written)


def int4_native_decode(x: torch.Tensor, w: int4_native.Int4Native, bias: torch.Tensor | None, out: torch.Tensor,
                       config: Config | None = None) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T + bias for M = 2..16, from the native layout; one launch when SPLIT_K == 1."""
    return splitk.finish(int4_native_decode_launch(x, w, bias, out, config), bias, out)

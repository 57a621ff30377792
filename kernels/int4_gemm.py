"""Fused int4 (AWQ GEMM layout, group-wise with zeros) dequantize + matmul: y = x @ W^T, fp32 accumulation.

The kernels read the checkpoint's own tensors (`qwen2q.quantizers.int4` owns the layout):

    qweight int32 [K, N / 8]       nibble i of word [k, c] holds q[k, 8c + NIBBLE_COLUMNS[i]]
    qzeros  int32 [K / G, N / 8]   zeros, packed the same way
    scales  fp16  [K / G, N]
    W^T[k, n] = (q[k, n] - zero[k // G, n]) * scale[k // G, n]     exact in fp32

The split-K decode (M = 2..16) and GEMM kernels read these tensors as they are: a tile of BLOCK_K x BLOCK_N / 8
words is expanded in registers by shifting each word by the nibble of each of its 8 columns, which puts the
columns back in natural order.  The M = 1 GEMV reads the layout `int4_native` makes once at load time
(3 SASS instructions per weight on sm_90 where this expansion takes 8; see kernels/NOTES.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2q.kernels import gemv, int4_native, skeletons, splitk
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import Config, decode_config, gemm_config, gemv_config, interpreting, shared_limit
from qwen2q.quantizers import int4

# Code fields of a native word view (int4_native): bits 11-14, 15-18, 19-22. Passed to the kernel as run-time
# values: as immediates, ptxas re-materialises one of the two LOP3 constants before every use (+1 SASS/weight).
_FIELDS = (0xF << 11, 0xF << 15, 0xF << 19)


# The GEMM's loop SASS per weight on sm_90 (Triton 3.9, Qwen2-7B, `report --m 2048`) and the packed bytes per
# weight, for `tiling.dequantize_first`.
GEMM_SASS_PER_WEIGHT = 11.2
PACKED_BYTES_PER_WEIGHT = (4 + 16 / 128 + 4 / 128) / 8

@triton.jit
def _column_shifts():
    """int32 [8]: column j of a packed word sits in bits 4 * ((j % 2) * 4 + j // 2) and up, the inverse of
    int4.NIBBLE_COLUMNS (0, 2, 4, 6, 1, 3, 5, 7); shifting by these puts the 8 columns in natural order."""
    j = tl.arange(0, 8)
    return ((j % 2) * 4 + j // 2) * 4


@triton.jit
def _dequantize_tile(words, zero_words, scales, shifts, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """One tile of W^T as fp32 [BLOCK_K, BLOCK_N] from qweight words [BLOCK_K, BLOCK_N / 8], qzeros words
    [BLOCK_K / G, BLOCK_N / 8] and fp16 scales [BLOCK_K / G, BLOCK_N]; (q - zero) * scale is exact in fp32.
    shifts [8]: `_column_shifts()`."""
    # >> on int32 is arithmetic: the mask drops the sign bits of the top nibble.
    codes = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_K, BLOCK_N / 8, 8]
    zeros = (zero_words[:, :, None] >> shifts[None, None, :]) & 0xF
    # Views by scale group: [groups, GROUP_SIZE, BLOCK_N] codes against [groups, 1, BLOCK_N] zeros and scales.
    codes = tl.reshape(codes, (BLOCK_K // GROUP_SIZE, GROUP_SIZE, BLOCK_N))
    zeros = tl.reshape(zeros, (BLOCK_K // GROUP_SIZE, 1, BLOCK_N))
    # Float subtraction: integer arithmetic on whole tiles is what the interpreter is slowest at.
    w = (codes.to(tl.float32) - zeros.to(tl.float32)) * scales.to(tl.float32)[:, None, :]
    return tl.reshape(w, (BLOCK_K, BLOCK_N))


@triton.jit
def _code_value(w, v1, v2, J: tl.constexpr, FIELD_11, FIELD_15, FIELD_19):
    """fp32 [BLOCK_N, 16]: MAGICS[J] + code J of every native word (int4_native), one LOP3 each.
    w: the words (uint32); v1, v2: w rotated right by 12, w shifted left by 8."""
    view = w if J < 3 else (v1 if J < 6 else v2)
    if J % 3 == 0:
        bits = (view & FIELD_11) | 0x45800000  # 4096 + q
    elif J % 3 == 1:
        bits = (view & FIELD_15) | 0x43800000  # 256 + q
    else:
        bits = (view & FIELD_19) | 0x41800000  # 16 + q
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _x_group_sums(x_ptr, sums_ptr, b, GROUP_SIZE: tl.constexpr):
    """Store sum(x) and sum(MAGIC_j x) over each scale group of 128-index block b at sums_ptr [groups, 2] (fp32):
    the correction every row of the block needs, computed once per program instead of per row."""
    CODES_PER_GROUP: tl.constexpr = GROUP_SIZE // 16
    j = tl.arange(0, 8)
    x = tl.load(x_ptr + b * 128 + j[:, None] * 16 + tl.arange(0, 16)[None, :]).to(tl.float32)  # [8 codes j, 16 c]
    magic = tl.where(j % 3 == 0, 4096.0, tl.where(j % 3 == 1, 256.0, 16.0))  # int4_native.MAGICS
    rows = tl.sum(x, axis=1)
    x_sum = tl.sum(tl.reshape(rows, (8 // CODES_PER_GROUP, CODES_PER_GROUP)), axis=1)
    magic_sum = tl.sum(tl.reshape(rows * magic, (8 // CODES_PER_GROUP, CODES_PER_GROUP)), axis=1)
    groups = b * (8 // CODES_PER_GROUP) + tl.arange(0, 8 // CODES_PER_GROUP)
    tl.store(sums_ptr + groups * 2, x_sum)
    tl.store(sums_ptr + groups * 2 + 1, magic_sum)


@triton.jit
def _gemv_block(w, x_ptrs, sums_ptr, zeros_ptrs, scales_ptrs, stride_zg, stride_sg, acc, corr,
                FIELD_11, FIELD_15, FIELD_19, GROUP_SIZE: tl.constexpr):
    """Add one 128-index block to the GEMV's accumulators.

    w uint32 [BLOCK_N, 16]: the block's native words; x_ptrs [16]: x at k = block start + c (c = 0..15; code j
    of word c multiplies x[16j + c]); sums_ptr: the block's first group's (sum x, sum MAGIC_j x) (`_x_group_sums`);
    zeros_ptrs, scales_ptrs [BLOCK_N]: the block's first group.
    acc fp32 [BLOCK_N, 16] += scale * sum_j x * (MAGIC_j + q); corr fp32 [BLOCK_N] += scale * (sum_j MAGIC_j
    x + zero * sum_j x), per group, so sum(acc, 1) - corr is sum_k x (q - zero) scale."""
    v1 = (w >> 12) | (w << 20)
    v2 = w << 8
    CODES_PER_GROUP: tl.constexpr = GROUP_SIZE // 16
    for g in tl.static_range(8 // CODES_PER_GROUP):
        part = tl.zeros(w.shape, dtype=tl.float32)
        for i in tl.static_range(CODES_PER_GROUP):
            # Upcast right after the load: the interpreter computes bf16 arithmetic wrongly.
            x = tl.load(x_ptrs + 16 * (g * CODES_PER_GROUP + i)).to(tl.float32)
            part += x[None, :] * _code_value(w, v1, v2, g * CODES_PER_GROUP + i, FIELD_11, FIELD_15, FIELD_19)
        x_sum = tl.load(sums_ptr + 2 * g)
        magic_sum = tl.load(sums_ptr + 2 * g + 1)
        scale = tl.load(scales_ptrs + g * stride_sg).to(tl.float32)
        zero = tl.load(zeros_ptrs + g * stride_zg).to(tl.float32)
        acc += scale[:, None] * part
        corr += scale * (magic_sum + zero * x_sum)
    return acc, corr


@triton.jit
def int4_gemv_kernel(
    # Pointers: x [1, K] (contiguous); words, zeros, scales: int4_native's layout; bias [N] or None;
    # out: y [1, N] in x's dtype when SPLIT_K == 1, else fp32 partials [SPLIT_K, 1, N]; sums: fp32 scratch
    # [N / BLOCK_N, K / GROUP_SIZE, 2], each program's own row
    x_ptr, words_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, sums_ptr,
    # Sizes; each program reduces BLOCKS_PER_SPLIT 128-index blocks
    N, K, BLOCKS_PER_SPLIT,
    # Strides (out: of its first dim, the split; sums: of its first dim)
    stride_wn, stride_zg, stride_sg, stride_os, stride_sums,
    # Code field masks (_FIELDS)
    FIELD_11, FIELD_15, FIELD_19,
    # y [1, N] and the arrival counters of `gemv.store`'s fix-up (FIXUP), else None
    y_ptr, counters_ptr,
    # Meta-parameters
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
    FIXUP: tl.constexpr,
):
    """y = x @ W^T for one row of x: each program owns BLOCK_N rows of W and a run of K blocks; it first sums x
    per scale group (the correction all its rows share), then streams the words, the next block's loaded before
    the current one is computed."""
    pid_k, first, last, offs_n, rows = gemv.program(BLOCKS_PER_SPLIT, K // 128, N, BLOCK_N)
    sums_ptr += tl.program_id(0) * stride_sums
    for b in range(first, last):
        _x_group_sums(x_ptr, sums_ptr, b, GROUP_SIZE)
    tl.debug_barrier()  # the sums are read by other threads of the program
    offs_c = tl.arange(0, 16)
    w_ptrs = words_ptr + rows[:, None] * stride_wn + offs_c[None, :]
    GROUPS_PER_BLOCK: tl.constexpr = 128 // GROUP_SIZE
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    corr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w_next = tl.load(w_ptrs + first * 16)
    for b in range(first, last):
        w = w_next.to(tl.uint32, bitcast=True)
        w_next = tl.load(w_ptrs + gemv.next_block(b, first, last) * 16)
        group = b * GROUPS_PER_BLOCK
        acc, corr = _gemv_block(w, x_ptr + b * 128 + offs_c, sums_ptr + 2 * group,
                                zeros_ptr + group * stride_zg + rows, scales_ptr + group * stride_sg + rows,
                                stride_zg, stride_sg, acc, corr, FIELD_11, FIELD_15, FIELD_19, GROUP_SIZE)
    gemv.store(tl.sum(acc, axis=1) - corr, offs_n, N, bias_ptr, out_ptr, pid_k, stride_os, y_ptr, counters_ptr,
               HAS_BIAS, SPLIT_K, FIXUP)


@triton.jit
def int4_tile(i, k0, k_left, pid_n, pid_k, offs_k, offs_n, n_mask, W0, W1, W2, W3, W4, W5, P0, P1, P2, S0, S1, S2,
              GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`skeletons` TILE: W^T [BLOCK_K, BLOCK_N] from W0 qweight [K, N / 8], W1 qzeros [K / G, N / 8], W2 scales
    [K / G, N] (rows contiguous, row strides S0, S1, S2); P0 = N / 8, passed so that Triton knows its divisibility
    (128-bit loads)."""
    offs_c = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # packed columns
    offs_g = tl.arange(0, BLOCK_K // GROUP_SIZE)
    c_mask, k_mask, g_mask = offs_c < P0, offs_k < k_left, offs_g * GROUP_SIZE < k_left
    groups = k0 // GROUP_SIZE + offs_g
    words = tl.load(W0 + (k0 + offs_k)[:, None] * S0 + offs_c[None, :], mask=k_mask[:, None] & c_mask[None, :],
                    other=0)
    zero_words = tl.load(W1 + groups[:, None] * S1 + offs_c[None, :], mask=g_mask[:, None] & c_mask[None, :], other=0)
    scales = tl.load(W2 + groups[:, None] * S2 + offs_n[None, :], mask=g_mask[:, None] & n_mask[None, :], other=0.0)
    return _dequantize_tile(words, zero_words, scales, _column_shifts(), GROUP_SIZE, BLOCK_K, BLOCK_N)


@triton.jit
def int4_dequantize_kernel(
    # Pointers: qweight, qzeros, scales as in the module docstring; wt: W^T [K, N] in the output dtype
    qweight_ptr, qzeros_ptr, scales_ptr, wt_ptr,
    # Sizes; strides
    N, NC, K, stride_qk, stride_zg, stride_sg, stride_wk,
    # Meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_K, BLOCK_N] tile of W^T, dequantized (exact in fp32) and rounded once to wt's dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    offs_g = tl.program_id(0) * (BLOCK_K // GROUP_SIZE) + tl.arange(0, BLOCK_K // GROUP_SIZE)
    k_mask, n_mask, c_mask, g_mask = offs_k < K, offs_n < N, offs_c < NC, offs_g < K // GROUP_SIZE
    words = tl.load(qweight_ptr + offs_k[:, None] * stride_qk + offs_c[None, :], mask=k_mask[:, None] & c_mask[None, :],
                    other=0)
    zero_words = tl.load(qzeros_ptr + offs_g[:, None] * stride_zg + offs_c[None, :],
                         mask=g_mask[:, None] & c_mask[None, :], other=0)
    scales = tl.load(scales_ptr + offs_g[:, None] * stride_sg + offs_n[None, :], mask=g_mask[:, None] & n_mask[None, :],
                     other=0.0)
    w = _dequantize_tile(words, zero_words, scales, _column_shifts(), GROUP_SIZE, BLOCK_K, BLOCK_N)
    tl.store(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], w.to(wt_ptr.dtype.element_ty),
             mask=k_mask[:, None] & n_mask[None, :])


def _tile(w: int4.Int4Weight) -> skeletons.Tile:
    qweight, qzeros, scales = (t if t.stride(1) == 1 else t.contiguous() for t in (w.qweight, w.qzeros, w.scales))
    return skeletons.Tile(int4_tile, skeletons.no_finish, (qweight, qzeros, scales),
                          lambda k_per_split: (w.out_features // 8,),
                          (qweight.stride(0), qzeros.stride(0), scales.stride(0)), w.group_size)


def int4_decode_launch(x: torch.Tensor, w: int4.Int4Weight, bias: torch.Tensor | None, out: torch.Tensor,
                       config: Config | None = None) -> Launch:
    """The split-K decode launch (`skeletons.decode_launch`) for x [M, K], M <= DECODE_MAX_M."""
    (M, K), N, G = x.shape, w.out_features, w.group_size
    config = config or decode_config(M, N, K, G, interpreting())
    if config.BLOCK_K % G or M > config.BLOCK_M or config.BLOCK_N % 8:
        raise ValueError(f"{config} cannot tile M={M} with group_size={G}")
    return skeletons.decode_launch(_tile(w), x, N, bias, out, config)


def int4_gemv_launch(x: torch.Tensor, w: int4_native.Int4Native, bias: torch.Tensor | None, out: torch.Tensor,
                     config: Config | None = None) -> Launch:
    """The GEMV's launch for x [1, K] (contiguous): grid (N / BLOCK_N, SPLIT_K); it writes out [1, N] itself
    when SPLIT_K == 1, else fp32 partials [SPLIT_K, 1, N] (Launch.out) for `splitk.reduce`."""
    K, N, G = w.in_features, w.out_features, w.group_size
    config = config or gemv_config(N, K, interpreting())
    if x.shape[0] != 1 or x.stride(1) != 1 or not int4_native.supports(K, G):
        raise ValueError(f"{config} cannot run the int4 GEMV on x {list(x.shape)} and W [{N}, {K}], group {G}")
    p = gemv.plan(N, K // int4_native.BLOCK_K, config, out)
    sums = torch.empty((p.grid[0], K // G, 2), dtype=torch.float32, device=x.device)  # a row per N tile
    args = (x, w.words, w.zeros, w.scales, bias, p.target, sums,
            N, K, p.blocks_per_split,
            w.words.stride(0), w.zeros.stride(0), w.scales.stride(0), p.target.stride(0), sums.stride(0),
            *_FIELDS)
    return gemv.launch(int4_gemv_kernel, p, config, args, bias, GROUP_SIZE=G)


def int4_gemv(x: torch.Tensor, w: int4_native.Int4Native, bias: torch.Tensor | None, out: torch.Tensor,
              config: Config | None = None) -> torch.Tensor:
    """M = 1 path: out [1, N] = x [1, K] @ W^T + bias from the native layout; one launch when SPLIT_K == 1."""
    return gemv.finish(int4_gemv_launch(x, w, bias, out, config), bias, out)


def int4_decode(x: torch.Tensor, w: int4.Int4Weight, bias: torch.Tensor | None, out: torch.Tensor,
                config: Config | None = None) -> torch.Tensor:
    """Decode path: out [M, N] = x [M, K] @ W^T + bias for M <= DECODE_MAX_M. Inputs are checked by
    `triton_ops`; here only the tiling constraints are."""
    return splitk.finish(int4_decode_launch(x, w, bias, out, config), bias, out)


def int4_gemm_launch(x: torch.Tensor, w: int4.Int4Weight, bias: torch.Tensor | None, out: torch.Tensor,
                     config: Config | None = None) -> Launch:
    """The GEMM launch (`skeletons.gemm_launch`) writing out [M, N] from x [M, K]."""
    (M, K), N, G = x.shape, w.out_features, w.group_size
    config = config or gemm_config(M, N, K, G, interpreting(), shared_limit(x.device))
    if config.BLOCK_K % G or config.BLOCK_M < 16 or config.BLOCK_N % 8:
        raise ValueError(f"{config} cannot tile group_size={G} with tl.dot")
    return skeletons.gemm_launch(_tile(w), x, N, bias, out, config)


def int4_gemm(x: torch.Tensor, w: int4.Int4Weight, bias: torch.Tensor | None, out: torch.Tensor,
              config: Config | None = None) -> torch.Tensor:
    """GEMM path: out [M, N] = x [M, K] @ W^T + bias, any M (chosen for M > DECODE_MAX_M)."""
    return int4_gemm_launch(x, w, bias, out, config)()


def int4_dequantize(w: int4.Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in `dtype` (bf16 or fp16), each weight (q - zero) * scale rounded once: the large-M path's
    dequantize-once, before a cuBLAS GEMM."""
    K, N, G = w.in_features, w.out_features, w.group_size
    wt = torch.empty((K, N), dtype=dtype, device=w.qweight.device)
    block_k = max(G, 64)
    grid = (triton.cdiv(K, block_k), triton.cdiv(N, 64))
    int4_dequantize_kernel[grid](w.qweight, w.qzeros, w.scales, wt, N, N // 8, K, w.qweight.stride(0),
                                 w.qzeros.stride(0), w.scales.stride(0), wt.stride(0), GROUP_SIZE=G, BLOCK_K=block_k,
                                 BLOCK_N=64)
    return wt

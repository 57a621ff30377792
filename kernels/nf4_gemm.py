"""Fused NF4 (bitsandbytes, double-quantized absmax) dequantize + matmul: y = x @ W^T, fp32 accumulation.

The kernels read the checkpoint's own tensors (`qwen2q.quantizers.nf4` owns the layout), for weights
whose rows hold whole 64-element blocks (K % 64 == 0, true of every Qwen2 projection):

    packed         uint8 [N * K / 2, 1]  byte n * K / 2 + k / 2 of row-major W [N, K]; even k in the high nibble
    absmax         uint8 [N * K / 64]    dynamic-map code of block b = (n * K + k) / 64, minus `offset`
    nested_absmax  fp32  [ceil(N * K / 64 / 256)]
    W[n, k] = NF4_LEVELS[code] * (dynamic_map[absmax[b]] * nested_absmax[b / 256] + offset)    in fp32

The absmax is decoded in the kernel, once per 64 weights, rather than precomputed at load time: the
kernel then moves 4 + 8/64 + 32/16384 = 4.127 bits per weight, where a precomputed fp32 absmax moves
4 + 32/64 = 4.5 (+9%, plus 0.5 bit per weight of resident memory) and a bf16 one 4.25 (+3%, and it no
longer matches the fp32 reference). Decoding costs three small loads (code, map entry, nested scale) and
one fma per 64 weights, and nothing has to be prepared or cached beyond two lookup tables per device.
Each 4-bit code is turned into its level by a load from the 16-entry table (L1-resident).

The M = 1 GEMV (`nf4_gemv_kernel`) reads the same bytes as int32 words [N, K / 8] (a free view): each thread
owns whole rows of one absmax block (8 words, two 128-bit loads per row).  The 16 levels live in registers:
lane L of every warp holds level[L % 16], and one `shfl.sync.idx` per weight fetches the level a code names.
shfl reads only bits 0-4 of its lane operand, so the word shifted right by 4j is already the index of nibble j
(bit 4, the next code's bit, picks the same level in the upper 16 lanes): one shift, one shuffle and one fma per
weight, 3.5 SASS instructions per weight on sm_90 with x and the absmax (kernels/NOTES.md).  Nibble j of word c
is k = 8c + 2 (j // 2) + 1 - j % 2 (bytes hold the even k in their high nibble).  A warp issues one shuffle per
32 weights and an SM retires ~one shuffle per clock, which caps the GEMV at ~32 weights per clock per SM (~0.9
of an H200's bandwidth; `report` models it).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qwen2q.kernels import gemv, skeletons, splitk
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import (
    INT8_GEMV_TILES, Config, decode_config, gemm_config, gemv_config, interpreting, shared_limit,
)
from qwen2q.quantizers import nf4

BLOCK = nf4.BLOCK_SIZE  # 64 weights per absmax; the kernels spell it 64, and 256 absmax per nested scale as >> 8


@functools.cache
def lookup_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 levels fp32 [16], dynamic map fp32 [256]) on `device`, made once per device."""
    return nf4.NF4_LEVELS.to(device), nf4.dynamic_map().to(device)


# The GEMM's loop SASS per weight on sm_90 (Triton 3.9, Qwen2-7B, `report --m 2048`) and the packed bytes per
# weight, for `tiling.dequantize_first`.
GEMM_SASS_PER_WEIGHT = 15.7
PACKED_BYTES_PER_WEIGHT = (4 + 8 / 64) / 8
DECODE_BLOCK_K = 2 * BLOCK  # K indices per decode-kernel iteration (whole absmax blocks)


@triton.jit
def _dequantize_tile(packed, levels_ptr, absmax, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of W^T as fp32 [BLOCK_K, BLOCK_N] from bytes [BLOCK_K / 2, BLOCK_N] (two consecutive k
    each, the even one in the high nibble) and decoded fp32 absmax [BLOCK_K / 64, BLOCK_N]."""
    nibble = tl.arange(0, 2)
    codes = (packed.to(tl.int32)[:, None, :] >> (4 - 4 * nibble)[None, :, None]) & 0xF  # [BLOCK_K / 2, 2, BLOCK_N]
    values = tl.reshape(tl.load(levels_ptr + codes), (BLOCK_K // 64, 64, BLOCK_N))
    return tl.reshape(values * absmax[:, None, :], (BLOCK_K, BLOCK_N))


@triton.jit
def _decode_absmax(absmax_ptr, nested_ptr, code_map_ptr, blocks, mask, offset):
    """fp32 absmax of `blocks`: dynamic_map[absmax[b]] * nested_absmax[b // 256] + offset."""
    code = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
    nested = tl.load(nested_ptr + (blocks >> 8), mask=mask, other=0.0)  # nf4.NESTED_BLOCK_SIZE = 256
    return tl.load(code_map_ptr + code) * nested + offset


GEMV_TILES = INT8_GEMV_TILES  # 8 rows (256 on one warp) or 4 rows (128) of 8 words per thread
_HIGH = -0x10000  # 0xFFFF0000 as int32: the upper half of a word of two bf16


@triton.jit
def _lane_levels(levels_ptr, like, INTERPRET: tl.constexpr):
    """The level table as the GEMV's shuffles read it: level[lane % 16] in every element of a tensor shaped like
    `like` (one register per thread once the compiler folds the copies).  Unused under the interpreter."""
    if INTERPRET:
        return tl.zeros(like.shape, dtype=tl.float32)
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)
    return tl.load(levels_ptr + (lane & 15))


@triton.jit
def _level(table, index, levels_ptr, INTERPRET: tl.constexpr):
    """fp32 level of the code in bits 0-3 of `index` (int32; higher bits ignored): a warp shuffle from the lane
    holding it (`_lane_levels`), or a table load under the interpreter, which runs no assembly."""
    if INTERPRET:
        return tl.load(levels_ptr + (index & 15))
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r", [table, index],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _x_pair_value(pair, HIGH, UPPER: tl.constexpr, X_BF16: tl.constexpr):
    """fp32 of one half of a word holding two activations (the upper half: the odd k): bit moves for bf16."""
    if X_BF16:
        bits = (pair & HIGH) if UPPER else (pair << 16)
        return bits.to(tl.float32, bitcast=True)
    halves = (pair >> 16) if UPPER else (pair & 0xFFFF)
    return halves.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _gemv_half(part, w, x_ptr, k0, table, levels_ptr, HIGH, X_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """part fp32 [BLOCK_N, 4] += sum_j x[k] * level(nibble j of w) for words w uint32 [BLOCK_N, 4] covering
    k0 .. k0 + 31 (word c: k0 + 8c .. k0 + 8c + 7)."""
    # x as 16 words of two activations: word 4c + p holds k0 + 8c + 2p (low half) and k0 + 8c + 2p + 1 (high).
    pairs = tl.load(x_ptr.to(tl.pointer_type(tl.uint32)) + k0 // 2 + tl.arange(0, 16))
    even_p, odd_p = tl.split(tl.reshape(pairs, (4, 2, 2)))  # [4, 2]: p = 0, 2 and p = 1, 3
    p0, p2 = tl.split(even_p)
    p1, p3 = tl.split(odd_p)
    for j in tl.static_range(8):
        # Nibble j is k = k0 + 8c + 2 (j // 2) + 1 - j % 2: pair j // 2, its upper half when j is even.
        pair = p0 if j // 2 == 0 else (p1 if j // 2 == 1 else (p2 if j // 2 == 2 else p3))
        x = _x_pair_value(pair, HIGH, j % 2 == 0, X_BF16)
        index = (w if j == 0 else w >> (4 * j)).to(tl.int32, bitcast=True)
        part += x[None, :] * _level(table, index, levels_ptr, INTERPRET)
    return part


@triton.jit
def nf4_gemv_kernel(
    # Pointers: x [1, K] (contiguous); packed as int32 words [N, K / 8]; absmax, nested_absmax as in the module
    # docstring; the NF4 levels [16] and the dynamic map [256] (fp32); bias [N] or None;
    # out: y [1, N] in x's dtype when SPLIT_K == 1, else fp32 partials [SPLIT_K, 1, N]
    x_ptr, words_ptr, absmax_ptr, nested_ptr, levels_ptr, code_map_ptr, bias_ptr, out_ptr,
    # The fp32 absmax offset; sizes; each program reduces BLOCKS_PER_SPLIT 64-weight blocks of every row
    offset, N, K, BLOCKS_PER_SPLIT,
    # Strides (words: of a row, in words; absmax: of a row, in blocks; out: of its first dim, the split); _HIGH
    stride_wn, stride_an, stride_os, HIGH,
    # y [1, N] and the arrival counters of `gemv.store`'s fix-up (FIXUP), else None
    y_ptr, counters_ptr,
    # Meta-parameters
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, X_BF16: tl.constexpr,
    INTERPRET: tl.constexpr, FIXUP: tl.constexpr,
):
    """y = x @ W^T for one row of x: per block, part[n, c] = sum over the block's 64 weights of x * level, then
    acc += part * absmax[n, block]; the next block's words are loaded before the current one is computed."""
    pid_k, first, last, offs_n, rows = gemv.program(BLOCKS_PER_SPLIT, K // 64, N, BLOCK_N)
    offs_c = tl.arange(0, 4)
    # Two [BLOCK_N, 4] tiles (words 0-3 and 4-7 of a block) so that one thread holds all 8 words of its rows.
    w_ptrs = words_ptr + rows[:, None] * stride_wn + offs_c[None, :]
    row_blocks = rows * stride_an
    acc = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    low_next = tl.load(w_ptrs + first * 8)
    high_next = tl.load(w_ptrs + first * 8 + 4)
    table = _lane_levels(levels_ptr, low_next, INTERPRET)
    for b in range(first, last):
        low = low_next.to(tl.uint32, bitcast=True)
        high = high_next.to(tl.uint32, bitcast=True)
        after = gemv.next_block(b, first, last)
        low_next = tl.load(w_ptrs + after * 8)
        high_next = tl.load(w_ptrs + after * 8 + 4)
        part = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
        part = _gemv_half(part, low, x_ptr, b * 64, table, levels_ptr, HIGH, X_BF16, INTERPRET)
        part = _gemv_half(part, high, x_ptr, b * 64 + 32, table, levels_ptr, HIGH, X_BF16, INTERPRET)
        absmax = _decode_absmax(absmax_ptr, nested_ptr, code_map_ptr, row_blocks + b, rows >= 0, offset)
        acc += part * absmax[:, None]
    gemv.store(tl.sum(acc, axis=1), offs_n, N, bias_ptr, out_ptr, pid_k, stride_os, y_ptr, counters_ptr, HAS_BIAS,
               SPLIT_K, FIXUP)


@triton.jit
def nf4_tile(i, k0, k_left, pid_n, pid_k, offs_k, offs_n, n_mask, W0, W1, W2, W3, W4, W5, P0, P1, P2, S0, S1, S2,
             GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`skeletons` TILE: W^T [BLOCK_K, BLOCK_N] from W0 packed, W1 absmax, W2 nested_absmax, W3 the levels, W4 the
    dynamic map (module docstring); P0 = K / 2 (a row's bytes), P1 = the bytes of a split, P2 = the absmax offset.
    The byte offset is pid_k * P1 + i * BLOCK_K / 2, not k0 / 2, so that Triton knows it divides by 16 (128-bit
    loads); bytes are masked per whole 64-weight block for the same reason."""
    tl.static_assert(BLOCK_K % 64 == 0)
    offs_byte = tl.arange(0, BLOCK_K // 2)
    offs_block = tl.arange(0, BLOCK_K // 64)
    blocks = offs_n[None, :] * (P0 // 32) + (k0 // 64 + offs_block)[:, None]  # row n starts at block n * K / 64
    absmax = _decode_absmax(W1, W2, W4, blocks, (offs_block * 64 < k_left)[:, None] & n_mask[None, :], P2)
    byte_mask = ((offs_byte // 32) * 64 < k_left)[:, None] & n_mask[None, :]
    packed = tl.load(W0 + offs_n[None, :] * P0 + (pid_k * P1 + i * (BLOCK_K // 2) + offs_byte)[:, None],
                     mask=byte_mask, other=0)
    return _dequantize_tile(packed, W3, absmax, BLOCK_K, BLOCK_N)


def _tile(w: nf4.NF4Weight, device: torch.device) -> skeletons.Tile:
    levels, code_map = lookup_tables(device)
    K = w.shape[1]
    return skeletons.Tile(nf4_tile, skeletons.no_finish, (w.packed, w.absmax, w.nested_absmax, levels, code_map),
                          lambda k_per_split: (K // 2, k_per_split // 2, w.offset), ())


def nf4_decode_launch(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
                      config: Config | None = None) -> Launch:
    """The split-K decode launch (`skeletons.decode_launch`) for x [M, K], M <= DECODE_MAX_M."""
    (M, K), N = x.shape, w.shape[0]
    config = config or decode_config(M, N, K, DECODE_BLOCK_K, interpreting())
    if config.BLOCK_K % BLOCK or M > config.BLOCK_M or K % BLOCK:
        raise ValueError(f"{config} cannot tile M={M}, K={K} in whole {BLOCK}-weight blocks")
    return skeletons.decode_launch(_tile(w, x.device), x, N, bias, out, config)


@triton.jit
def nf4_dequantize_kernel(
    # Pointers: packed, absmax, nested_absmax as in the module docstring; the NF4 levels [16] and the dynamic map
    # [256] (fp32); wt: W^T [K, N] in the output dtype
    packed_ptr, absmax_ptr, nested_ptr, levels_ptr, code_map_ptr, wt_ptr,
    # The fp32 absmax offset; sizes (HALF_K = K / 2); W^T's row stride
    offset, N, K, HALF_K, stride_wk,
    # Meta-parameters
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_K, BLOCK_N] tile of W^T: level * absmax in fp32, rounded once to wt's dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_byte = tl.program_id(0) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    offs_block = tl.program_id(0) * (BLOCK_K // 64) + tl.arange(0, BLOCK_K // 64)
    n_mask = offs_n < N
    packed = tl.load(packed_ptr + offs_n[None, :] * HALF_K + offs_byte[:, None],
                     mask=((offs_byte // 32) * 64 < K)[:, None] & n_mask[None, :], other=0)
    b_mask = (offs_block < K // 64)[:, None] & n_mask[None, :]
    absmax = _decode_absmax(absmax_ptr, nested_ptr, code_map_ptr, offs_n[None, :] * (K // 64) + offs_block[:, None],
                            b_mask, offset)
    w = _dequantize_tile(packed, levels_ptr, absmax, BLOCK_K, BLOCK_N)
    tl.store(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], w.to(wt_ptr.dtype.element_ty),
             mask=(offs_k < K)[:, None] & n_mask[None, :])


def gemv_applies(w: nf4.NF4Weight) -> bool:
    """True when the M = 1 GEMV takes W: whole 64-weight blocks per row, N in whole 128-row tiles, packed bytes
    16-byte aligned (so each row's words load 128 bits at a time)."""
    N, K = w.shape
    return K % BLOCK == 0 and N % GEMV_TILES[-1][0] == 0 and w.packed.data_ptr() % 16 == 0


def nf4_gemv_launch(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
                    config: Config | None = None) -> Launch:
    """The GEMV's launch for x [1, K] (contiguous): grid (N / BLOCK_N, SPLIT_K); it writes out [1, N] itself
    when SPLIT_K == 1, else fp32 partials [SPLIT_K, 1, N] (Launch.out) for `splitk.reduce`."""
    (M, K), N = x.shape, w.shape[0]
    config = config or gemv_config(N, K, interpreting(), BLOCK, GEMV_TILES)
    if M != 1 or x.stride(1) != 1 or config.BLOCK_K != BLOCK or not gemv_applies(w):
        raise ValueError(f"{config} cannot run the NF4 GEMV on x {list(x.shape)} and W [{N}, {K}]")
    p = gemv.plan(N, K // BLOCK, config, out)
    words = w.packed.view(N, K // 2).view(torch.int32)
    levels, code_map = lookup_tables(x.device)
    args = (x, words, w.absmax, w.nested_absmax, levels, code_map, bias, p.target,
            w.offset, N, K, p.blocks_per_split,
            words.stride(0), K // BLOCK, p.target.stride(0), _HIGH)
    return gemv.launch(nf4_gemv_kernel, p, config, args, bias, X_BF16=x.dtype == torch.bfloat16,
                       INTERPRET=interpreting())


def nf4_gemv(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
             config: Config | None = None) -> torch.Tensor:
    """M = 1 path: out [1, N] = x [1, K] @ W^T + bias; one launch when SPLIT_K == 1."""
    return gemv.finish(nf4_gemv_launch(x, w, bias, out, config), bias, out)


def nf4_decode(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
               config: Config | None = None) -> torch.Tensor:
    """Decode path: out [M, N] = x [M, K] @ W^T + bias for M <= DECODE_MAX_M. Inputs are checked by
    `triton_ops`; here only the tiling constraints are."""
    return splitk.finish(nf4_decode_launch(x, w, bias, out, config), bias, out)


def nf4_gemm_launch(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
                    config: Config | None = None) -> Launch:
    """The GEMM launch (`skeletons.gemm_launch`) writing out [M, N] from x [M, K]."""
    (M, K), N = x.shape, w.shape[0]
    config = config or gemm_config(M, N, K, BLOCK, interpreting(), shared_limit(x.device))
    if config.BLOCK_K % BLOCK or config.BLOCK_M < 16 or K % BLOCK:
        raise ValueError(f"{config} cannot tile K={K} in whole {BLOCK}-weight blocks with tl.dot")
    return skeletons.gemm_launch(_tile(w, x.device), x, N, bias, out, config)


def nf4_gemm(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
             config: Config | None = None) -> torch.Tensor:
    """GEMM path: out [M, N] = x [M, K] @ W^T + bias, any M (chosen for M > DECODE_MAX_M)."""
    return nf4_gemm_launch(x, w, bias, out, config)()


def nf4_dequantize(w: nf4.NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in `dtype` (bf16 or fp16), each weight rounded once: the large-M path's dequantize-once."""
    N, K = w.shape
    wt = torch.empty((K, N), dtype=dtype, device=w.packed.device)
    levels, code_map = lookup_tables(wt.device)
    grid = (triton.cdiv(K, 64), triton.cdiv(N, 64))
    nf4_dequantize_kernel[grid](w.packed, w.absmax, w.nested_absmax, levels, code_map, wt, w.offset, N, K, K // 2,
                                wt.stride(0), BLOCK_K=64, BLOCK_N=64)
    return wt

"""Fused int8 (per-row absmax, weight-only) dequantize + matmul: y = x @ W^T, fp32 accumulation.

The kernels read the checkpoint's own tensors (`qwen2q.quantizers.int8` owns the layout):

    qweight  int8 [N, K]   row-major
    absmax   fp32 [N]      W[n, k] = qweight[n, k] * absmax[n] / 127

The per-row scale is constant along the reduction, so it is applied once per output after the K loop:
y[m, n] = (sum_k x[m, k] * qweight[n, k]) * absmax[n] / 127. Codes enter tl.dot exactly (|q| <= 127 fits
the 8-bit significand of bf16 and fp16), so the only roundings are the fp32 sums and the output cast.

The M = 1 GEMV (`int8_gemv_kernel`) reads the same bytes as int32 words [N, K / 4] (a free view), 128 bits of a
row per load, and turns each byte into a float with one instruction and no conversion: flipping the sign bits
(one XOR per word: b + 128 in 0..255) and moving byte i to bits 8-15 under the exponent 0x47 (one `prmt`) gives
exactly 32768 + 128 + b.  The magic 32896 times sum(x) is subtracted once per program (see `_byte_value`);
2.5 SASS instructions per weight on sm_90, where the split-K kernel's conversions take 5.1 (kernels/NOTES.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2q.kernels import gemv, skeletons, splitk
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import (
    INT8_GEMV_TILES, Config, decode_config, gemm_config, gemv_config, interpreting, shared_limit,
)
from qwen2q.quantizers import int8


# The GEMM's loop SASS per weight on sm_90 (Triton 3.9, Qwen2-7B, `report --m 2048`) and the packed bytes per
# weight, for `tiling.dequantize_first`.
GEMM_SASS_PER_WEIGHT = 5.8
PACKED_BYTES_PER_WEIGHT = 1.0

@triton.jit
def _row_scales(absmax_ptr, offs_n, N):
    """fp32 [BLOCK_N]: absmax[n] / 127, the factor that turns code sums into outputs."""
    return tl.load(absmax_ptr + offs_n, mask=offs_n < N, other=0.0) / 127.0


GEMV_WORDS = 8  # int32 words of a row per GEMV iteration: 32 weights, two 128-bit loads
GEMV_BLOCK_K = 4 * GEMV_WORDS
MAGIC = tl.constexpr(32768.0 + 128.0)  # what a code reads as after the flip and `_byte_value`, minus the code itself
# Run-time arguments, not literals: values of 2**31 and above would make Triton type the expressions int64.
_FLIP = -0x7F7F7F80  # 0x80808080 as int32: the sign bit of every byte
_EXPONENT = 0x47000000  # fp32 2**15; a byte at bits 8-15 under it adds its value
_HIGH = -0x10000  # 0xFFFF0000 as int32: the upper half of a word of two bf16


@triton.jit
def _byte_value(u, I: tl.constexpr, EXPONENT, INTERPRET: tl.constexpr):
    """fp32 32768 + byte I of u (uint32), exact: the byte moved to bits 8-15 under the exponent of 2**15.
    On a GPU one `prmt` (selector bytes: 0x00, byte I, 0x00, 0x47); the interpreter, which runs no assembly,
    shifts and masks."""
    if INTERPRET:
        return (((u >> (8 * I)) & 0xFF) << 8 | EXPONENT).to(tl.float32, bitcast=True)
    SELECTOR: tl.constexpr = 0x7504 | (I << 4)
    return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {SELECTOR};", "=r,r,r", [u, EXPONENT],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _x_columns(x_ptr, b, HIGH, WORDS: tl.constexpr, X_BF16: tl.constexpr):
    """fp32 [WORDS] x 4: x[32b + 4c + i] for c = 0..WORDS-1, i = 0..3 (byte i of word c multiplies it).
    bf16 pairs are widened by bit moves (one instruction each); fp16 by conversion."""
    if X_BF16:
        pairs = tl.load(x_ptr.to(tl.pointer_type(tl.uint32)) + b * (2 * WORDS) + tl.arange(0, 2 * WORDS))
        even, odd = tl.split(tl.reshape(pairs, (WORDS, 2)))  # x[4c], x[4c + 1] in one word; x[4c + 2], x[4c + 3]
        x0 = (even << 16).to(tl.float32, bitcast=True)
        x1 = (even & HIGH).to(tl.float32, bitcast=True)
        x2 = (odd << 16).to(tl.float32, bitcast=True)
        x3 = (odd & HIGH).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + b * (4 * WORDS) + tl.arange(0, 4 * WORDS)).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (WORDS, 2, 2)))  # [WORDS, 2]: x[4c + 2a], x[4c + 2a + 1]
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def int8_gemv_kernel(
    # Pointers: x [1, K] (contiguous); qweight as int32 words [N, K / 4]; absmax fp32 [N]; bias [N] or None;
    # out: y [1, N] in x's dtype when SPLIT_K == 1, else fp32 partials [SPLIT_K, 1, N]
    x_ptr, words_ptr, absmax_ptr, bias_ptr, out_ptr,
    # Sizes; each program reduces BLOCKS_PER_SPLIT blocks of GEMV_BLOCK_K input channels
    N, K, BLOCKS_PER_SPLIT,
    # Strides (words: of a row, in words; out: of its first dim, the split)
    stride_wn, stride_os,
    # _FLIP, _EXPONENT, _HIGH
    FLIP, EXPONENT, HIGH,
    # y [1, N] and the arrival counters of `gemv.store`'s fix-up (FIXUP), else None
    y_ptr, counters_ptr,
    # Meta-parameters
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
    X_BF16: tl.constexpr, INTERPRET: tl.constexpr, FIXUP: tl.constexpr,
):
    """y = x @ W^T for one row of x: acc[n, c] += sum_i x[4c + i] * (MAGIC + q[n, 4c + i]) over the program's
    blocks; y[n] = (sum_c acc[n, c] - MAGIC * sum x) * absmax[n] / 127."""
    pid_k, first, last, offs_n, rows = gemv.program(BLOCKS_PER_SPLIT, K // (4 * WORDS), N, BLOCK_N)
    w_ptrs = words_ptr + rows[:, None] * stride_wn + tl.arange(0, WORDS)[None, :]
    # sum(x) over the program's K range, before the loop: the loop keeps only the products.
    x_sum = tl.zeros((WORDS,), dtype=tl.float32)
    for b in range(first, last):
        x0, x1, x2, x3 = _x_columns(x_ptr, b, HIGH, WORDS, X_BF16)
        x_sum += (x0 + x1) + (x2 + x3)
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    w_next = tl.load(w_ptrs + first * WORDS)
    for b in range(first, last):
        u = w_next.to(tl.uint32, bitcast=True) ^ FLIP
        w_next = tl.load(w_ptrs + gemv.next_block(b, first, last) * WORDS)
        x0, x1, x2, x3 = _x_columns(x_ptr, b, HIGH, WORDS, X_BF16)
        acc += x0[None, :] * _byte_value(u, 0, EXPONENT, INTERPRET)
        acc += x1[None, :] * _byte_value(u, 1, EXPONENT, INTERPRET)
        acc += x2[None, :] * _byte_value(u, 2, EXPONENT, INTERPRET)
        acc += x3[None, :] * _byte_value(u, 3, EXPONENT, INTERPRET)
    y = (tl.sum(acc, axis=1) - MAGIC * tl.sum(x_sum, axis=0)) * _row_scales(absmax_ptr, rows, N)
    gemv.store(y, offs_n, N, bias_ptr, out_ptr, pid_k, stride_os, y_ptr, counters_ptr, HAS_BIAS, SPLIT_K, FIXUP)


@triton.jit
def int8_tile(i, k0, k_left, pid_n, pid_k, offs_k, offs_n, n_mask, W0, W1, W2, W3, W4, W5, P0, P1, P2, S0, S1, S2,
              GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`skeletons` TILE: the codes of W^T [BLOCK_K, BLOCK_N] as fp32 (exact), the row scale left to `int8_finish`.
    W0: qweight int8 [N, K], S0 its row stride."""
    mask = (offs_k < k_left)[:, None] & n_mask[None, :]
    return tl.load(W0 + offs_n[None, :] * S0 + (k0 + offs_k)[:, None], mask=mask, other=0).to(tl.float32)


@triton.jit
def int8_finish(acc, offs_n, N, W0, W1, W2, W3, W4, W5):
    """`skeletons` FINISH: the per-row scale absmax / 127 (W1), applied once after the K reduction."""
    return acc * _row_scales(W1, offs_n, N)[None, :]


def _tile(w: int8.Int8Weight) -> skeletons.Tile:
    qweight = w.qweight if w.qweight.stride(1) == 1 else w.qweight.contiguous()
    return skeletons.Tile(int8_tile, int8_finish, (qweight, w.absmax), lambda k_per_split: (), (qweight.stride(0),))


def int8_decode_launch(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
                       config: Config | None = None) -> Launch:
    """The split-K decode launch (`skeletons.decode_launch`) for x [M, K], M <= DECODE_MAX_M."""
    (M, K), N = x.shape, w.qweight.shape[0]
    config = config or decode_config(M, N, K, 16, interpreting())
    if M > config.BLOCK_M:
        raise ValueError(f"{config} cannot tile M={M}")
    return skeletons.decode_launch(_tile(w), x, N, bias, out, config)


@triton.jit
def int8_dequantize_kernel(
    # Pointers: qweight int8 [N, K]; absmax fp32 [N]; wt: W^T [K, N] in the output dtype
    qweight_ptr, absmax_ptr, wt_ptr,
    # Sizes; strides
    N, K, stride_qn, stride_wk,
    # Meta-parameters
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_K, BLOCK_N] tile of W^T: q * (absmax / 127) in fp32, rounded once to wt's dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    q = tl.load(qweight_ptr + offs_n[None, :] * stride_qn + offs_k[:, None], mask=mask, other=0).to(tl.float32)
    w = q * _row_scales(absmax_ptr, offs_n, N)[None, :]
    tl.store(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], w.to(wt_ptr.dtype.element_ty), mask=mask)


def gemv_applies(w: int8.Int8Weight) -> bool:
    """True when the M = 1 GEMV takes W: K in whole 32-weight blocks, N in whole 128-row tiles, rows contiguous and
    16-byte aligned (so its loads are 128 bits wide)."""
    N, K = w.qweight.shape
    return (K % GEMV_BLOCK_K == 0 and N % INT8_GEMV_TILES[-1][0] == 0 and w.qweight.stride() == (K, 1)
            and w.qweight.data_ptr() % 16 == 0)


def int8_gemv_launch(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
                     config: Config | None = None) -> Launch:
    """The GEMV's launch for x [1, K] (contiguous): grid (N / BLOCK_N, SPLIT_K); it writes out [1, N] itself
    when SPLIT_K == 1, else fp32 partials [SPLIT_K, 1, N] (Launch.out) for `splitk.reduce`."""
    (M, K), N = x.shape, w.qweight.shape[0]
    config = config or gemv_config(N, K, interpreting(), GEMV_BLOCK_K, INT8_GEMV_TILES)
    if M != 1 or x.stride(1) != 1 or not gemv_applies(w):
        raise ValueError(f"{config} cannot run the int8 GEMV on x {list(x.shape)} and W [{N}, {K}]")
    p = gemv.plan(N, K // GEMV_BLOCK_K, config, out)
    words = w.qweight.view(torch.int32)
    args = (x, words, w.absmax, bias, p.target,
            N, K, p.blocks_per_split,
            words.stride(0), p.target.stride(0),
            _FLIP, _EXPONENT, _HIGH)
    return gemv.launch(int8_gemv_kernel, p, config, args, bias, WORDS=GEMV_WORDS,
                       X_BF16=x.dtype == torch.bfloat16, INTERPRET=interpreting())


def int8_gemv(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
              config: Config | None = None) -> torch.Tensor:
    """M = 1 path: out [1, N] = x [1, K] @ W^T + bias; one launch when SPLIT_K == 1."""
    return gemv.finish(int8_gemv_launch(x, w, bias, out, config), bias, out)


def int8_decode(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
                config: Config | None = None) -> torch.Tensor:
    """Decode path: out [M, N] = x [M, K] @ W^T + bias for M <= DECODE_MAX_M. Inputs are checked by
    `triton_ops`; here only the tiling constraints are."""
    return splitk.finish(int8_decode_launch(x, w, bias, out, config), bias, out)


def int8_gemm_launch(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
                     config: Config | None = None) -> Launch:
    """The GEMM launch (`skeletons.gemm_launch`) writing out [M, N] from x [M, K]."""
    (M, K), N = x.shape, w.qweight.shape[0]
    config = config or gemm_config(M, N, K, 16, interpreting(), shared_limit(x.device))
    if config.BLOCK_M < 16:
        raise ValueError(f"{config}: tl.dot needs BLOCK_M >= 16")
    return skeletons.gemm_launch(_tile(w), x, N, bias, out, config)


def int8_gemm(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
              config: Config | None = None) -> torch.Tensor:
    """GEMM path: out [M, N] = x [M, K] @ W^T + bias, any M (chosen for M > DECODE_MAX_M)."""
    return int8_gemm_launch(x, w, bias, out, config)()


def int8_dequantize(w: int8.Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in `dtype` (bf16 or fp16), each weight rounded once: the large-M path's dequantize-once."""
    N, K = w.qweight.shape
    wt = torch.empty((K, N), dtype=dtype, device=w.qweight.device)
    grid = (triton.cdiv(K, 64), triton.cdiv(N, 64))
    int8_dequantize_kernel[grid](w.qweight, w.absmax, wt, N, K, w.qweight.stride(0), wt.stride(0), BLOCK_K=64,
                                 BLOCK_N=64)
    return wt

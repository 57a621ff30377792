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
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qwen2q.kernels import splitk
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import (
    Config, decode_config, decode_k_per_split, dot_dtype, gemm_config, interpreting, multiply_accumulate,
    store_output,
)
from qwen2q.quantizers import nf4

BLOCK = nf4.BLOCK_SIZE  # 64 weights per absmax; the kernels spell it 64, and 256 absmax per nested scale as >> 8


@functools.cache
def lookup_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 levels fp32 [16], dynamic map fp32 [256]) on `device`, made once per device."""
    return nf4.NF4_LEVELS.to(device), nf4.dynamic_map().to(device)


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


@triton.jit
def nf4_decode_kernel(
    # Pointers: x [M, K]; packed, absmax, nested_absmax as in the module docstring; the NF4 levels [16] and
    # the dynamic map [256] (fp32); partials fp32 [SPLIT_K, M, N]
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, levels_ptr, code_map_ptr, partial_ptr,
    # The fp32 absmax offset; sizes; each program reduces K_PER_SPLIT (a multiple of BLOCK_K) input channels
    offset, M, N, K, K_PER_SPLIT,
    # Strides
    stride_xm, stride_xk,
    stride_ps, stride_pm, stride_pn,
    # Meta-parameters
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 64 == 0)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_byte = tl.arange(0, BLOCK_K // 2)
    offs_block = tl.arange(0, BLOCK_K // 64)
    m_mask, n_mask = offs_m < M, offs_n < N
    # Row n of W starts at byte n * K / 2 and at block n * K / 64.
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    p_ptrs = packed_ptr + offs_n[None, :] * (K // 2) + (k_start // 2 + offs_byte)[:, None]
    blocks = offs_n[None, :] * (K // 64) + (k_start // 64 + offs_block)[:, None]
    x_step = BLOCK_K * stride_xk
    byte_starts, block_starts = offs_byte * 2, offs_block * 64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_left = k_end - k0
        b_mask = (block_starts < k_left)[:, None] & n_mask[None, :]
        absmax = _decode_absmax(absmax_ptr, nested_ptr, code_map_ptr, blocks, b_mask, offset)
        packed = tl.load(p_ptrs, mask=(byte_starts < k_left)[:, None] & n_mask[None, :], other=0)
        w = _dequantize_tile(packed, levels_ptr, absmax, BLOCK_K, BLOCK_N)
        # Upcast right after the load: the interpreter computes bf16 arithmetic wrongly.
        x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < k_left)[None, :], other=0.0).to(tl.float32)
        acc = multiply_accumulate(acc, x, w, BLOCK_M, DOT_DTYPE)
        x_ptrs += x_step
        p_ptrs += BLOCK_K // 2
        blocks += BLOCK_K // 64
    out_ptrs = partial_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    tl.store(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def nf4_gemm_kernel(
    # Pointers: x [M, K]; packed, absmax, nested_absmax as in the module docstring; the NF4 levels [16] and
    # the dynamic map [256] (fp32); bias [N] or None; out [M, N]
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, levels_ptr, code_map_ptr, bias_ptr, out_ptr,
    # The fp32 absmax offset; sizes
    offset, M, N, K,
    # Strides
    stride_xm, stride_xk,
    stride_om, stride_on,
    # Meta-parameters
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 64 == 0)
    # Grouped ordering: GROUP_M consecutive M tiles walk the same W rows while they are in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_byte = tl.arange(0, BLOCK_K // 2)
    offs_block = tl.arange(0, BLOCK_K // 64)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    p_ptrs = packed_ptr + offs_n[None, :] * (K // 2) + offs_byte[:, None]
    blocks = offs_n[None, :] * (K // 64) + offs_block[:, None]
    x_step = BLOCK_K * stride_xk
    byte_starts, block_starts = offs_byte * 2, offs_block * 64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        b_mask = (block_starts < k_left)[:, None] & n_mask[None, :]
        absmax = _decode_absmax(absmax_ptr, nested_ptr, code_map_ptr, blocks, b_mask, offset)
        packed = tl.load(p_ptrs, mask=(byte_starts < k_left)[:, None] & n_mask[None, :], other=0)
        w = _dequantize_tile(packed, levels_ptr, absmax, BLOCK_K, BLOCK_N)
        x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < k_left)[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
        x_ptrs += x_step
        p_ptrs += BLOCK_K // 2
        blocks += BLOCK_K // 64
    store_output(out_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def _weight_args(w: nf4.NF4Weight, device: torch.device) -> tuple:
    levels, code_map = lookup_tables(device)
    return (w.packed, w.absmax, w.nested_absmax, levels, code_map)


def nf4_decode_launch(x: torch.Tensor, w: nf4.NF4Weight, config: Config | None = None) -> Launch:
    """The decode kernel's launch for x [M, K] (M <= DECODE_MAX_M): the config `tiling` picks, grid
    (N / BLOCK_N, SPLIT_K), and fp32 partials [SPLIT_K, M, N] on x's device for it to write."""
    (M, K), N = x.shape, w.shape[0]
    config = config or decode_config(M, N, K, BLOCK, interpreting())
    if config.BLOCK_K % BLOCK or M > config.BLOCK_M or K % BLOCK:
        raise ValueError(f"{config} cannot tile M={M}, K={K} in whole {BLOCK}-weight blocks")
    partials = torch.empty((config.SPLIT_K, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, config.BLOCK_N), config.SPLIT_K)
    args = (x, *_weight_args(w, x.device), partials,
            w.offset, M, N, K, decode_k_per_split(K, config),
            x.stride(0), x.stride(1),
            partials.stride(0), partials.stride(1), partials.stride(2))
    kwargs = dict(DOT_DTYPE=dot_dtype(x),
                  BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(nf4_decode_kernel, grid, args, kwargs, config, partials)


def nf4_decode(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
               config: Config | None = None) -> torch.Tensor:
    """Decode path: out [M, N] = x [M, K] @ W^T + bias for M <= DECODE_MAX_M. Inputs are checked by
    `triton_ops`; here only the tiling constraints are."""
    return splitk.reduce(nf4_decode_launch(x, w, config)(), bias, out)


def nf4_gemm_launch(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
                    config: Config | None = None) -> Launch:
    """The GEMM kernel's launch writing out [M, N] from x [M, K]: the config `tiling` picks and a 1-D grid
    of M tiles x N tiles."""
    (M, K), N = x.shape, w.shape[0]
    config = config or gemm_config(M, N, K, BLOCK, interpreting())
    if config.BLOCK_K % BLOCK or config.BLOCK_M < 16 or K % BLOCK:
        raise ValueError(f"{config} cannot tile K={K} in whole {BLOCK}-weight blocks with tl.dot")
    grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N),)
    args = (x, *_weight_args(w, x.device), bias, out,
            w.offset, M, N, K,
            x.stride(0), x.stride(1),
            out.stride(0), out.stride(1))
    kwargs = dict(HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype(x),
                  BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(nf4_gemm_kernel, grid, args, kwargs, config, out)


def nf4_gemm(x: torch.Tensor, w: nf4.NF4Weight, bias: torch.Tensor | None, out: torch.Tensor,
             config: Config | None = None) -> torch.Tensor:
    """GEMM path: out [M, N] = x [M, K] @ W^T + bias, any M (chosen for M > DECODE_MAX_M)."""
    return nf4_gemm_launch(x, w, bias, out, config)()

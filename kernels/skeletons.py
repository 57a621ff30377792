"""The split-K decode (M = 2..16) and GEMM skeletons every format shares, parameterised by the format's tile.

A format supplies two `@triton.jit` functions, passed to the kernels as constexprs (one compiled kernel per
format, as before), and the arguments they read:

    TILE(i, k0, k_left, pid_n, pid_k, offs_k, offs_n, n_mask, W0..W5, P0..P2, S0..S2, GROUP_SIZE, BLOCK_K,
         BLOCK_N)
        -> fp32 [BLOCK_K, BLOCK_N]: W^T for K indices k0 + offs_k (the program's i-th K tile; k_left of them
           are in range) and rows offs_n (N tile pid_n), dequantized; zero where out of range
    FINISH(acc, offs_n, N, W0..W5) -> acc [BLOCK_M, BLOCK_N] after the K loop (int8: its per-row scale)

    W0..W5  the format's tensors (pointers; None where it has fewer)
    P0..P2  its integers or floats (sizes Triton should know the divisibility of, the NF4 offset)
    S0..S2  its strides

The skeletons own the rest: program ids (split-K columns, or grouped tiles), the K loop, the activations, the
multiply-accumulate (CUDA cores for one row, `tl.dot` otherwise), the epilogue (`splitk.decode_store`, or
`store_output` with the bias).  `decode_launch` / `gemm_launch` build their `Launch` from a format's `Tile`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from qwen2q.kernels import splitk
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import (
    Config, decode_k_per_split, dot_dtype, grouped_tile, multiply_accumulate, store_output,
)


@triton.jit
def decode_kernel(
    # Pointers: x [M, K]; the format's tensors; bias [N] or None; out: y [M, N] when SPLIT_K == 1, else fp32
    # partials [SPLIT_K, M, N]
    x_ptr, W0, W1, W2, W3, W4, W5, bias_ptr, out_ptr,
    # Sizes; each program reduces K_PER_SPLIT (a multiple of BLOCK_K) input channels; the format's values
    M, N, K, K_PER_SPLIT, P0, P1, P2,
    # Strides: x, the format's, out
    stride_xm, stride_xk, S0, S1, S2, stride_os, stride_om, stride_on,
    # With FIXUP (`splitk.fixup_store`): y [M, N], the arrival counters, y's strides; else None, None, 0, 0
    y_ptr, counters_ptr, stride_ym, stride_yn,
    # Meta-parameters
    TILE: tl.constexpr, FINISH: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIXUP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    x_step = BLOCK_K * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.cdiv(k_end - k_start, BLOCK_K)):
        k0 = k_start + i * BLOCK_K
        k_left = k_end - k0
        w = TILE(i, k0, k_left, pid_n, pid_k, offs_k, offs_n, n_mask, W0, W1, W2, W3, W4, W5, P0, P1, P2, S0, S1, S2,
                 GROUP_SIZE, BLOCK_K, BLOCK_N)
        # Upcast right after the load: the interpreter computes bf16 arithmetic wrongly.
        x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < k_left)[None, :], other=0.0).to(tl.float32)
        acc = multiply_accumulate(acc, x, w, BLOCK_M, DOT_DTYPE)
        x_ptrs += x_step
    acc = FINISH(acc, offs_n, N, W0, W1, W2, W3, W4, W5)  # linear, so it commutes with the split-K sum
    if FIXUP:
        splitk.fixup_store(acc, out_ptr, y_ptr, counters_ptr, bias_ptr, pid_k, pid_n, SPLIT_K, offs_m, offs_n, M, N,
                           stride_os, stride_om, stride_on, stride_ym, stride_yn, HAS_BIAS)
    else:
        splitk.decode_store(acc, out_ptr, bias_ptr, pid_k, offs_m, offs_n, M, N, stride_os, stride_om, stride_on,
                            HAS_BIAS, SPLIT_K)


@triton.jit
def gemm_kernel(
    # Pointers: x [M, K]; the format's tensors; bias [N] or None; out [M, N]
    x_ptr, W0, W1, W2, W3, W4, W5, bias_ptr, out_ptr,
    # Sizes; the format's values
    M, N, K, P0, P1, P2,
    # Strides: x, the format's, out
    stride_xm, stride_xk, S0, S1, S2, stride_om, stride_on,
    # Meta-parameters
    TILE: tl.constexpr, FINISH: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    x_step = BLOCK_K * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = i * BLOCK_K
        k_left = K - k0
        w = TILE(i, k0, k_left, pid_n, 0, offs_k, offs_n, n_mask, W0, W1, W2, W3, W4, W5, P0, P1, P2, S0, S1, S2,
                 GROUP_SIZE, BLOCK_K, BLOCK_N)
        x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < k_left)[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
        x_ptrs += x_step
    acc = FINISH(acc, offs_n, N, W0, W1, W2, W3, W4, W5)
    store_output(out_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


@triton.jit
def no_finish(acc, offs_n, N, W0, W1, W2, W3, W4, W5):
    """FINISH of formats whose tile already carries every scale."""
    return acc


@dataclass(frozen=True)
class Tile:
    """A format's part of a skeleton launch: its TILE and FINISH functions, tensors (up to 6), values (up to 3,
    given per split by `values(k_per_split)` since NF4's byte offset of a split depends on it), strides (up to 3)
    and GROUP_SIZE."""

    tile: Any
    finish: Any
    tensors: tuple
    values: Any  # k_per_split -> tuple of up to 3 numbers
    strides: tuple
    group_size: int = 1

    def arguments(self, k_per_split: int) -> tuple:
        values = tuple(self.values(k_per_split))
        return (*self.tensors, *(None,) * (6 - len(self.tensors))), (*values, *(0,) * (3 - len(values))), \
            (*self.strides, *(0,) * (3 - len(self.strides)))


def decode_launch(t: Tile, x: torch.Tensor, N: int, bias: torch.Tensor | None, out: torch.Tensor,
                  config: Config) -> Launch:
    """The split-K decode launch for x [M, K]: grid (N / BLOCK_N, SPLIT_K); it writes out [M, N] itself (bias
    included) when SPLIT_K == 1 or with `splitk.FIXUP`, else fp32 partials [SPLIT_K, M, N] (Launch.out) for
    `splitk.reduce`."""
    (M, K) = x.shape
    k_per_split = decode_k_per_split(K, config)
    tensors, values, strides = t.arguments(k_per_split)
    written, (stride_os, stride_om, stride_on) = splitk.target(config.SPLIT_K, out)
    grid = (triton.cdiv(N, config.BLOCK_N), config.SPLIT_K)
    result, fixup = splitk.fixup_arguments(config.SPLIT_K, grid[0], out, written)
    args = (x, *tensors, bias, written,
            M, N, K, k_per_split, *values,
            x.stride(0), x.stride(1), *strides, stride_os, stride_om, stride_on)
    kwargs = dict(TILE=t.tile, FINISH=t.finish, GROUP_SIZE=t.group_size, DOT_DTYPE=dot_dtype(x),
                  HAS_BIAS=bias is not None, SPLIT_K=config.SPLIT_K,
                  BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, **fixup,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(decode_kernel, grid, args, kwargs, config, result)


def gemm_launch(t: Tile, x: torch.Tensor, N: int, bias: torch.Tensor | None, out: torch.Tensor,
                config: Config) -> Launch:
    """The GEMM launch writing out [M, N] from x [M, K]: a 1-D grid of M tiles x N tiles, grouped."""
    M, K = x.shape
    tensors, values, strides = t.arguments(K)
    grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N),)
    args = (x, *tensors, bias, out,
            M, N, K, *values,
            x.stride(0), x.stride(1), *strides, out.stride(0), out.stride(1))
    kwargs = dict(TILE=t.tile, FINISH=t.finish, GROUP_SIZE=t.group_size, DOT_DTYPE=dot_dtype(x),
                  HAS_BIAS=bias is not None, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K,
                  GROUP_M=config.GROUP_M, num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(gemm_kernel, grid, args, kwargs, config, out)

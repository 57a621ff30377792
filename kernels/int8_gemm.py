"""Fused int8 (per-row absmax, weight-only) dequantize + matmul: y = x @ W^T, fp32 accumulation.

The kernels read the checkpoint's own tensors (`qwen2q.quantizers.int8` owns the layout):

    qweight  int8 [N, K]   row-major
    absmax   fp32 [N]      W[n, k] = qweight[n, k] * absmax[n] / 127

The per-row scale is constant along the reduction, so it is applied once per output after the K loop:
y[m, n] = (sum_k x[m, k] * qweight[n, k]) * absmax[n] / 127. Codes enter tl.dot exactly (|q| <= 127 fits
the 8-bit significand of bf16 and fp16), so the only roundings are the fp32 sums and the output cast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2q.kernels import splitk
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import (
    Config, decode_config, decode_k_per_split, dot_dtype, gemm_config, interpreting, multiply_accumulate,
    store_output,
)
from qwen2q.quantizers import int8


@triton.jit
def _row_scales(absmax_ptr, offs_n, N):
    """fp32 [BLOCK_N]: absmax[n] / 127, the factor that turns code sums into outputs."""
    return tl.load(absmax_ptr + offs_n, mask=offs_n < N, other=0.0) / 127.0


@triton.jit
def int8_decode_kernel(
    # Pointers: x [M, K]; qweight int8 [N, K]; absmax fp32 [N]; partials fp32 [SPLIT_K, M, N]
    x_ptr, qweight_ptr, absmax_ptr, partial_ptr,
    # Sizes; each program reduces K_PER_SPLIT (a multiple of BLOCK_K) input channels
    M, N, K, K_PER_SPLIT,
    # Strides
    stride_xm, stride_xk,
    stride_qn, stride_qk,
    stride_ps, stride_pm, stride_pn,
    # Meta-parameters
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    q_ptrs = qweight_ptr + offs_n[None, :] * stride_qn + (k_start + offs_k)[:, None] * stride_qk  # W^T tile
    x_step, q_step = BLOCK_K * stride_xk, BLOCK_K * stride_qk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k0
        w = tl.load(q_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0).to(tl.float32)
        # Upcast right after the load: the interpreter computes bf16 arithmetic wrongly.
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc = multiply_accumulate(acc, x, w, BLOCK_M, DOT_DTYPE)
        x_ptrs += x_step
        q_ptrs += q_step
    acc *= _row_scales(absmax_ptr, offs_n, N)[None, :]  # linear, so it commutes with the split-K sum
    out_ptrs = partial_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    tl.store(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def int8_gemm_kernel(
    # Pointers: x [M, K]; qweight int8 [N, K]; absmax fp32 [N]; bias [N] or None; out [M, N]
    x_ptr, qweight_ptr, absmax_ptr, bias_ptr, out_ptr,
    # Sizes
    M, N, K,
    # Strides
    stride_xm, stride_xk,
    stride_qn, stride_qk,
    stride_om, stride_on,
    # Meta-parameters
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
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
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    q_ptrs = qweight_ptr + offs_n[None, :] * stride_qn + offs_k[:, None] * stride_qk  # W^T tile
    x_step, q_step = BLOCK_K * stride_xk, BLOCK_K * stride_qk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        w = tl.load(q_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0).to(tl.float32)
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
        x_ptrs += x_step
        q_ptrs += q_step
    acc *= _row_scales(absmax_ptr, offs_n, N)[None, :]
    store_output(out_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def int8_decode_launch(x: torch.Tensor, w: int8.Int8Weight, config: Config | None = None) -> Launch:
    """The decode kernel's launch for x [M, K] (M <= DECODE_MAX_M): the config `tiling` picks, grid
    (N / BLOCK_N, SPLIT_K), and fp32 partials [SPLIT_K, M, N] on x's device for it to write."""
    (M, K), N = x.shape, w.qweight.shape[0]
    config = config or decode_config(M, N, K, 16, interpreting())
    if M > config.BLOCK_M:
        raise ValueError(f"{config} cannot tile M={M}")
    partials = torch.empty((config.SPLIT_K, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, config.BLOCK_N), config.SPLIT_K)
    args = (x, w.qweight, w.absmax, partials,
            M, N, K, decode_k_per_split(K, config),
            x.stride(0), x.stride(1),
            w.qweight.stride(0), w.qweight.stride(1),
            partials.stride(0), partials.stride(1), partials.stride(2))
    kwargs = dict(DOT_DTYPE=dot_dtype(x),
                  BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(int8_decode_kernel, grid, args, kwargs, config, partials)


def int8_decode(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
                config: Config | None = None) -> torch.Tensor:
    """Decode path: out [M, N] = x [M, K] @ W^T + bias for M <= DECODE_MAX_M. Inputs are checked by
    `triton_ops`; here only the tiling constraints are."""
    return splitk.reduce(int8_decode_launch(x, w, config)(), bias, out)


def int8_gemm_launch(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
                     config: Config | None = None) -> Launch:
    """The GEMM kernel's launch writing out [M, N] from x [M, K]: the config `tiling` picks and a 1-D grid
    of M tiles x N tiles."""
    (M, K), N = x.shape, w.qweight.shape[0]
    config = config or gemm_config(M, N, K, 16, interpreting())
    if config.BLOCK_M < 16:
        raise ValueError(f"{config}: tl.dot needs BLOCK_M >= 16")
    grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N),)
    args = (x, w.qweight, w.absmax, bias, out,
            M, N, K,
            x.stride(0), x.stride(1),
            w.qweight.stride(0), w.qweight.stride(1),
            out.stride(0), out.stride(1))
    kwargs = dict(HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype(x),
                  BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(int8_gemm_kernel, grid, args, kwargs, config, out)


def int8_gemm(x: torch.Tensor, w: int8.Int8Weight, bias: torch.Tensor | None, out: torch.Tensor,
              config: Config | None = None) -> torch.Tensor:
    """GEMM path: out [M, N] = x [M, K] @ W^T + bias, any M (chosen for M > DECODE_MAX_M)."""
    return int8_gemm_launch(x, w, bias, out, config)()

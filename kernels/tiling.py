"""How the quantized matmuls cut work into tiles: the path and block sizes for (M, N, K), and the steps every
format's kernels share (the inner multiply-accumulate and the output epilogue).

Two paths, picked by M (the number of activation rows):

    decode  M <= DECODE_MAX_M   grid (N tiles, SPLIT_K); each program reduces one K slice of one N tile for
                                all M rows and writes fp32 partials [SPLIT_K, M, N]; `splitk.reduce` sums
                                them in a fixed order, adds the bias and casts (deterministic, no atomics).
                                BLOCK_M = 1 for M = 1: a CUDA-core GEMV (multiply, then `tl.sum` over K);
                                BLOCK_M = 16 for M = 2..16: `tl.dot` (tensor cores need M >= 16).
    gemm    M > DECODE_MAX_M    the Triton tutorial's grouped 2-D tiling, `tl.dot` with fp32 accumulation,
                                bias and cast in the epilogue; or, where `dequantize_first` predicts it faster
                                (large M), W^T dequantized once to x's dtype and a cuBLAS GEMM.

Block sizes are a small function of (M, N, K), not tuned: tuning is a GPU job. Under the Triton
interpreter (TRITON_INTERPRET=1, CPU tensors) every program and every tensor op costs Python overhead,
so blocks there are one power of two covering the shape (capped) and SPLIT_K is 2, which still
exercises masking, the K loop and the split-K reduction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DECODE_MAX_M = 16
DOT_MIN_M = 16  # tl.dot needs at least 16 rows on a GPU
_DECODE_PROGRAMS = 512  # enough programs to keep every SM of an H100/H200 (132 SMs) streaming weights
_MAX_SPLIT_K = 16


@dataclass(frozen=True)
class Config:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1  # decode path only
    GROUP_M: int = 8  # gemm path only: M tiles that share a band of W in L2
    num_warps: int = 4
    num_stages: int = 2


def interpreting() -> bool:
    """True when kernels run under the Triton interpreter (TRITON_INTERPRET=1; tensors may be on the CPU)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; earlier versions read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(x: torch.Tensor):
    """tl.dot operand type: x's own type on a GPU (so bf16 is never cast through fp16). The interpreter
    gets bf16 dots wrong, so there both operands go in as fp32 (exact products, fp32 sums)."""
    if interpreting():
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _interpreter_block(size: int, cap: int, multiple: int) -> int:
    """Under the interpreter: one power-of-two block covering `size`, at most `cap` (and >= `multiple`)."""
    return max(multiple, min(cap, triton.next_power_of_2(size)))


def is_decode(M: int) -> bool:
    """True when M rows of x take the split-K decode kernels, False for the GEMM kernels."""
    return M <= DECODE_MAX_M


def decode_config(M: int, N: int, K: int, k_multiple: int, interpret: bool) -> Config:
    """Decode path (M <= DECODE_MAX_M). BLOCK_K is a multiple of `k_multiple` (the format's scale group)."""
    block_m = 1 if M == 1 else DOT_MIN_M
    if interpret:
        block_n, block_k, split_k = _interpreter_block(N, 1024, 16), _interpreter_block(K, 512, k_multiple), 2
    else:
        # BLOCK_M * BLOCK_K * BLOCK_N products live in registers in the GEMV (BLOCK_M = 1).
        block_n, block_k = 64, max(128, k_multiple)
        split_k = max(1, min(_MAX_SPLIT_K, _DECODE_PROGRAMS // triton.cdiv(N, block_n)))
    k_tiles = triton.cdiv(K, block_k)
    tiles_per_split = triton.cdiv(k_tiles, min(split_k, k_tiles))
    return Config(block_m, block_n, block_k, SPLIT_K=triton.cdiv(k_tiles, tiles_per_split), num_warps=4)


GEMV_BLOCK_K = 128  # K indices per int4 GEMV iteration (int4_native.BLOCK_K)
_GEMV_CTAS = 4 * 132  # CTAs the M = 1 GEMV aims for: 4 resident per SM of an H100/H200 (~250 registers x 64 threads)
_GEMV_MAX_SPLIT_K = 32
# (BLOCK_N, num_warps) of a GEMV program: the wide tile first, the narrow one where wide tiles leave too few
# programs.  Both give a thread 8 (int4) or 16 (int8) rows of one 128-bit load each per iteration.
INT4_GEMV_TILES = ((128, 2), (64, 1))
INT8_GEMV_TILES = ((256, 1), (128, 1))


def gemv_config(N: int, K: int, interpret: bool, block_k: int = GEMV_BLOCK_K,
                tiles: tuple[tuple[int, int], ...] = INT4_GEMV_TILES) -> Config:
    """The M = 1 GEMV (`gemv`): BLOCK_N rows per program from `tiles` (the wide tile where N takes it and it
    leaves enough programs, else the narrow one) and SPLIT_K runs of `block_k`-index blocks, enough programs to
    keep ~4 CTAs on every SM streaming (`_GEMV_CTAS`), since each holds one block in flight while it computes the
    previous one.  Under the interpreter: one wide tile and SPLIT_K = 2."""
    blocks = max(1, K // block_k)
    if interpret:
        block_n = next((b for b in (1024, 512, 256, 128, 64) if N % b == 0), 64)
        return Config(1, block_n, block_k, SPLIT_K=min(2, blocks), num_warps=1, num_stages=1)
    (wide, wide_warps), (narrow, narrow_warps) = tiles
    # A last tile that reaches past N reloads row N - 1 (`gemv.program`): the wide tile needs N >= wide, not N % wide.
    use_wide = N >= wide and triton.cdiv(N, wide) * blocks >= _GEMV_CTAS
    block_n, warps = (wide, wide_warps) if use_wide else (narrow, narrow_warps)
    n_tiles = triton.cdiv(N, block_n)
    # At most 32 splits of 128-index blocks, and as many more as a format's blocks are shorter.
    max_split = min(_GEMV_MAX_SPLIT_K * GEMV_BLOCK_K // block_k, blocks)
    split_k = max(1, min(max_split, triton.cdiv(_GEMV_CTAS, n_tiles)))
    return Config(1, block_n, block_k, SPLIT_K=split_k, num_warps=warps, num_stages=1)


# int4 M = 2..512 on the native layout (`int4_decode`): 128 rows per program, 16, 32 or 64 rows of x.  For
# 16 rows two warps (they share each x tile, half the L2 reads of one-warp programs); for 32 and 64 four (Triton's
# wgmma then, where two warps need 254 registers or spill).  Three stages: two blocks (16 KB) in flight.
NATIVE_DECODE_BLOCK_N = 128
_NATIVE_DECODE_CTAS = 2 * 132  # two programs per SM: 32 KB in flight each, past the ~23 KB Little's law asks


def native_decode_config(M: int, N: int, K: int, interpret: bool,
                         tile: tuple[int, int, int] | None = None) -> Config:
    """`int4_decode`'s tiling of x [M, K] @ W^T (K in 128-index blocks): M tiles of 16, 32 or 64 rows, SPLIT_K runs
    of blocks, enough for ~2 programs per SM (more splits mean more fp32 partials, M x N x 4 bytes each).  `tile`
    (BLOCK_N, num_warps, num_stages) replaces the default (for tuning on a GPU: `dev gpu-check`).  Under the
    interpreter: one N tile covering N (capped) and SPLIT_K = 2."""
    blocks = max(1, K // GEMV_BLOCK_K)
    block_m = min(64, max(DOT_MIN_M, triton.next_power_of_2(M)))
    if interpret:
        return Config(block_m, _interpreter_block(N, 256, 16), GEMV_BLOCK_K, SPLIT_K=min(2, blocks), num_warps=1,
                      num_stages=1)
    block_n, warps, stages = tile or (NATIVE_DECODE_BLOCK_N, 2 if block_m == 16 else 4, 3)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split_k = max(1, min(_GEMV_MAX_SPLIT_K, blocks, triton.cdiv(_NATIVE_DECODE_CTAS, tiles)))
    return Config(block_m, block_n, GEMV_BLOCK_K, SPLIT_K=split_k, num_warps=warps, num_stages=stages)


def decode_k_per_split(K: int, config: Config) -> int:
    """Length of each program's K slice: a whole number of BLOCK_K tiles."""
    return _round_up(triton.cdiv(K, config.SPLIT_K), config.BLOCK_K)


# Shared memory one block may take, by compute capability (CUDA guide): sm_86 / sm_89 (Ampere / Ada consumer
# parts) allow 99 KiB, where sm_80 allows 163 and sm_90 227.
SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
offline_arch: int | None = None  # the architecture `report` compiles for, while it builds launches


def shared_limit(device: torch.device) -> int | None:
    """Bytes of shared memory a block may take on `device` (None: unknown, or not a GPU)."""
    if offline_arch is not None:
        return SHARED_PER_BLOCK.get(offline_arch)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return SHARED_PER_BLOCK.get(10 * major + minor)


def gemm_config(M: int, N: int, K: int, k_multiple: int, interpret: bool, shared: int | None = None) -> Config:
    """GEMM path (M > DECODE_MAX_M). BLOCK_K is a multiple of `k_multiple`; `shared` the device's shared memory
    per block (`shared_limit`): under 128 KiB the 128-row tiles keep two stages instead of three (int4's take
    ~144 KiB with three)."""
    if interpret:
        block_m = _interpreter_block(M, 128, DOT_MIN_M)
        return Config(block_m, _interpreter_block(N, 512, 16), _interpreter_block(K, 512, k_multiple))
    block_m = 64 if M <= 64 else 128
    stages = 2 if block_m == 128 and shared is not None and shared < 128 * 1024 else 3
    return Config(block_m, 128, max(64, k_multiple), num_warps=4 if block_m == 64 else 8, num_stages=stages)


# The large-M choice, from report.py's model (H200: 132 SMs x 4 schedulers at 1.755 GHz, 4.3 TB/s, 989 TFLOP/s):
# the fused GEMM dequantizes every weight once per M tile, so its instruction issue grows with M / BLOCK_M, while
# dequantize-once writes W^T in bf16 (2 bytes per weight) and leaves the product to cuBLAS.
_ISSUE_PER_S, _BYTES_PER_S, _FLOPS_PER_S = 132 * 4 * 1.755e9, 4.3e12, 989e12


def dequantize_first(M: int, N: int, K: int, fused_sass_per_weight: float, packed_bytes_per_weight: float) -> bool:
    """True when y = x W^T (x [M, K], W [N, K]) is predicted faster as dequantize W^T to bf16 + a cuBLAS GEMM than
    as the fused GEMM, whose loop issues `fused_sass_per_weight` instructions per weight per M tile (the report's
    `sass_per_weight`).  A static model, not a measurement: times are max(tensor, issue) for the fused kernel and
    memory (packed bytes in, 2 bytes out) + max(tensor, memory) for the other."""
    tensor = 2 * M * N * K / _FLOPS_PER_S
    block_m = gemm_config(M, N, K, 1, interpret=False).BLOCK_M
    fused = max(tensor, triton.cdiv(M, block_m) * N * K * fused_sass_per_weight / 32 / _ISSUE_PER_S)
    dequantize = N * K * (packed_bytes_per_weight + 2) / _BYTES_PER_S
    cublas = max(tensor, 2 * (N * K + M * K + M * N) / _BYTES_PER_S)
    return dequantize + cublas < fused


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` of a 1-D GEMM grid, in grouped order: GROUP_M consecutive M tiles walk the
    same band of W while it is in L2 (the Triton tutorial's ordering)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def multiply_accumulate(acc, x, w, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 += x [BLOCK_M, BLOCK_K] @ w [BLOCK_K, BLOCK_N], both given in fp32.

    BLOCK_M < 16 runs on CUDA cores (GEMV: products, then a sum over K); otherwise `tl.dot` in DOT_DTYPE.
    """
    if BLOCK_M < 16:
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    else:
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
    return acc


@triton.jit
def store_output(out_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS: tl.constexpr):
    """Epilogue: out[offs_m, offs_n] = acc + bias, cast once from fp32 to out's dtype; rows/columns out of
    range are not written."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

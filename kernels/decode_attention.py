"""Attention of the static decode path over the KV cache, reading only the positions each query may see.

PyTorch's SDPA cannot run a grouped-query attention with a mask on its fused backends: with `enable_gqa` and the
static path's mask it falls back to the math backend, about 8 kernels a layer (the keys and values repeated to
every query head, two matmuls, the mask, softmax), over the whole cache whatever the length so far.  This is one
launch (two past `SPLIT_POSITIONS` cache positions), flash-decoding style:

- program (b * HK + h, split): the G = HQ / HK query heads of key/value head h, for every token t of q, as the
  rows of one tile (ROWS >= 16, a power of two: row r is head h * G + r // T, token r % T), over the split's
  range of cache positions in blocks of BLOCK_S;
- scores q k^T on tensor cores (fp32 accumulation), an online softmax in fp32 with exp2, p v on tensor cores
  with p rounded to the activations' dtype;
- key j is seen by token t when j <= positions[t] (and j > positions[t] - window with a sliding window): the
  static mask, computed here; blocks past the largest position are never read (the grid stays fixed, so a CUDA
  graph replays it at any length);
- one split: the output is written normalized; several: each writes (acc, m, l) and `combine_kernel` merges them.

Shapes: q [B, HQ, T, D]; k_cache, v_cache [B, HK, S, D] (last dims contiguous); positions int64 [T]; out
[B, HQ, T, D] contiguous in q's dtype.  Numerics: fp32 scores and softmax (SDPA's math backend rounds them to
the activations' dtype), so the result is closer to float64 than PyTorch's, not equal to it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import Config, dot_dtype

BLOCK_S = 64  # cache positions per step
SPLIT_POSITIONS = 512  # positions per split: one split (no combine launch) up to this cache length
MAX_SPLITS = 64
MAX_ROWS = 64  # query heads per key head x tokens, padded to a power of two >= 16
_LOG2E = 1.4426950408889634


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, part_ptr, stat_ptr,
    T, HK, window, scale_log2e, positions_per_split,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """out (one split) or partials [B * HK, splits, ROWS, D] and stats [B * HK, splits, ROWS, 2] (m, l)."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // HK, bh % HK
    r = tl.arange(0, ROWS)
    g, t = r // T, r % T
    row_ok = r < G * T
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    pos = tl.load(pos_ptr + t, mask=row_ok, other=-1)
    lo = split * positions_per_split
    hi = tl.minimum(lo + positions_per_split, tl.max(pos, axis=0) + 1)
    if HAS_WINDOW:  # no row sees a key at or below min(pos) - window
        first = tl.min(tl.where(row_ok, pos, 2**62), axis=0) - window + 1
        lo = tl.maximum(lo, first // BLOCK_S * BLOCK_S)
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
    for start in range(lo, hi, BLOCK_S):
        j = start + tl.arange(0, BLOCK_S)
        in_range = j < hi
        k = tl.load(k_base + j[:, None] * sk_s + d[None, :], mask=in_range[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE))) * scale_log2e  # [ROWS, BLOCK_S], log2 units
        seen = (j[None, :] <= pos[:, None]) & in_range[None, :]
        if HAS_WINDOW:
            seen = seen & (j[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + j[:, None] * sv_s + d[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))  # p rounded to the activations' type
        m = m_new
    if SPLIT:
        n_splits = tl.num_programs(1)
        cell = (bh * n_splits + split) * ROWS + r
        tl.store(part_ptr + cell[:, None] * D + d[None, :], acc)
        tl.store(stat_ptr + cell * 2, m)
        tl.store(stat_ptr + cell * 2 + 1, l)
    else:
        HQ = HK * G
        tl.store(out_ptr + ((b * HQ + h * G + g)[:, None] * T + t[:, None]) * D + d[None, :],
                 (acc / tl.maximum(l, 1e-30)[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def combine_kernel(part_ptr, stat_ptr, out_ptr, T, HK, n_splits,
                   G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """out rows of program b * HK + h: the splits' (acc, m, l) merged, sum(2^(m_i - M) acc_i) / sum(2^(m_i - M) l_i)."""
    bh = tl.program_id(0)
    b, h = bh // HK, bh % HK
    r = tl.arange(0, ROWS)
    g, t = r // T, r % T
    d = tl.arange(0, D)
    big_m = tl.full((ROWS,), float("-inf"), tl.float32)
    for i in range(0, n_splits):
        big_m = tl.maximum(big_m, tl.load(stat_ptr + ((bh * n_splits + i) * ROWS + r) * 2))
    big_m = tl.where(big_m == float("-inf"), 0.0, big_m)
    acc = tl.zeros((ROWS, D), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    for i in range(0, n_splits):
        cell = (bh * n_splits + i) * ROWS + r
        w = tl.exp2(tl.load(stat_ptr + cell * 2) - big_m)
        l += w * tl.load(stat_ptr + cell * 2 + 1)
        acc += w[:, None] * tl.load(part_ptr + cell[:, None] * D + d[None, :])
    HQ = HK * G
    tl.store(out_ptr + ((b * HQ + h * G + g)[:, None] * T + t[:, None]) * D + d[None, :],
             (acc / tl.maximum(l, 1e-30)[:, None]).to(out_ptr.dtype.element_ty), mask=(r < G * T)[:, None])


def rows_for(group: int, T: int) -> int:
    """The tile's row count for `group` query heads per key head and T tokens: a power of two >= 16."""
    return max(16, triton.next_power_of_2(group * T))


def applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when the kernel takes q [B, HQ, T, D] against caches [B, HK, S, D]: bf16 / fp16, HQ a multiple of HK,
    D a power of two from 16 to 256, at most MAX_ROWS rows per key head."""
    (_, HQ, T, D), HK = q.shape, k_cache.shape[1]
    return (q.dtype in (torch.bfloat16, torch.float16) and HK > 0 and HQ % HK == 0 and 16 <= D <= 256
            and D & (D - 1) == 0 and rows_for(HQ // HK, T) <= MAX_ROWS)


def splits_for(S: int) -> int:
    """Splits of a cache of S positions: one up to SPLIT_POSITIONS, then one per SPLIT_POSITIONS, at most
    MAX_SPLITS."""
    return max(1, min(MAX_SPLITS, triton.cdiv(S, SPLIT_POSITIONS)))


def decode_attention_launches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              positions: torch.Tensor, out: torch.Tensor, window: int | None,
                              n_splits: int | None = None) -> list[Launch]:
    """The launches writing out [B, HQ, T, D]: the attention kernel and, with several splits, the combine."""
    (B, HQ, T, D), (HK, S) = q.shape, k_cache.shape[1:3]
    G = HQ // HK
    rows = rows_for(G, T)
    n_splits = n_splits or splits_for(S)
    per_split = triton.cdiv(triton.cdiv(S, n_splits), BLOCK_S) * BLOCK_S
    split = n_splits > 1
    part = torch.empty((B * HK, n_splits, rows, D) if split else (1,), dtype=torch.float32, device=q.device)
    stat = torch.empty((B * HK, n_splits, rows, 2) if split else (1,), dtype=torch.float32, device=q.device)
    args = (q, k_cache, v_cache, positions, out, part, stat, T, HK, window or 0, _LOG2E / math.sqrt(D), per_split,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    kwargs = dict(G=G, ROWS=rows, D=D, BLOCK_S=BLOCK_S, SPLIT=split, HAS_WINDOW=window is not None,
                  DOT_DTYPE=dot_dtype(q), num_warps=4, num_stages=2)
    launches = [Launch(decode_attention_kernel, (B * HK, n_splits), args, kwargs, Config(rows, D, BLOCK_S), out)]
    if split:
        launches.append(Launch(combine_kernel, (B * HK,), (part, stat, out, T, HK, n_splits),
                               dict(G=G, ROWS=rows, D=D, num_warps=4, num_stages=1), Config(rows, D, 1), out))
    return launches


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     window: int | None = None, n_splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, HQ, T, D] at cache positions `positions` (int64 [T] on the device,
    each < S) over k_cache, v_cache [B, HK, S, D], token t seeing keys j <= positions[t] (and > positions[t] -
    window): the static path's masked attention.  Returns a new contiguous [B, HQ, T, D] in q's dtype."""
    (B, HQ, T, D), S = q.shape, k_cache.shape[2]
    if not applies(q, k_cache) or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D \
            or {k_cache.dtype, v_cache.dtype} != {q.dtype} or positions.shape != (T,) \
            or positions.dtype != torch.int64 or q.stride(-1) != 1 or k_cache.stride(-1) != 1 \
            or v_cache.stride(-1) != 1 or (window is not None and window < 1):
        raise ValueError(f"decode_attention: q {list(q.shape)} {q.dtype}, caches {list(k_cache.shape)} {k_cache.dtype}"
                         f" and {list(v_cache.shape)} {v_cache.dtype}, positions {list(positions.shape)}"
                         f" {positions.dtype}, window {window}: need q [B, HQ, T, D] and caches [B, HK, S, D] in one"
                         f" bf16 / fp16 dtype with contiguous last dims, HQ % HK == 0, D a power of two in 16..256,"
                         f" (HQ / HK) * T <= {MAX_ROWS}, positions int64 [T], window >= 1")
    out = torch.empty((B, HQ, T, D), dtype=q.dtype, device=q.device)
    if B * T and S:
        for launch in decode_attention_launches(q, k_cache, v_cache, positions.contiguous(), out, window, n_splits):
            launch()
    return out

"""A decoder layer's small steps as single Triton launches: RMSNorm (after the residual add, if asked), rotary
embeddings on q and k together, and silu(gate) * up.

Why: at batch 1 a decode step is a chain of tiny kernels.  In PyTorch (`qwen2q.model`, `qwen2q.rope`) an RMSNorm
is 8 of them (to fp32, pow, mean, add, rsqrt, mul, to, mul), rotary 5 per tensor (mul, neg, cat, mul, add), the
KV cache write 2 (index_copy_), the gated activation 2, the residual adds 2: 35 of a layer's 40 kernels besides the
7 matmuls and attention, 980 per token on a 28-layer model, each costing its launch and ramp inside a CUDA graph
(~2 us) while an int4 7B token's weights take about 1 ms to stream.  Here they are 4 launches a layer: two RMSNorms
with the residual add before them, rotary with the cache write, silu * up.

Numerics: each kernel rounds where the PyTorch code rounds (every bf16 / fp16 op computes in fp32 and rounds
once), so rotary and the activation give PyTorch's bits (up to exp's last fp32 bit in silu), and RMSNorm differs
only in the order of its fp32 sum of squares.  Shapes: the last dim of every tensor must be contiguous; outputs
are new contiguous tensors in the input's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import Config

SILU_BLOCK = 1024  # elements of silu(gate) * up per program


@triton.jit
def rms_norm_kernel(
    # x, delta (read), total (written: x + delta), weight [D], out: rows of D, each with its own row stride
    x_ptr, delta_ptr, total_ptr, w_ptr, out_ptr,
    D, stride_x, stride_d, stride_t, stride_o, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row: s = x (+ delta, rounded and stored), out = weight * (s * rsqrt(mean(s^2) + eps)) rounded twice,
    as `RMSNorm.forward` rounds."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * stride_d + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(total_ptr.dtype.element_ty)
        tl.store(total_ptr + row * stride_t + offs, x, mask=mask)
    xf = x.to(tl.float32)
    mean_square = tl.sum(xf * xf, axis=0) / D
    inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(mean_square + eps))  # correctly rounded, as 1 / sqrt on the CPU
    normed = (xf * inv_rms).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _rotate_half(x_ptr, out_ptr, cos_ptr, sin_ptr, HALF: tl.constexpr):
    """out = x * cos + rotate_half(x) * sin for one head vector of 2 HALF values, PyTorch's three roundings."""
    offs = tl.arange(0, HALF)
    lo = tl.load(x_ptr + offs).to(tl.float32)
    hi = tl.load(x_ptr + HALF + offs).to(tl.float32)
    c_lo = tl.load(cos_ptr + offs).to(tl.float32)
    c_hi = tl.load(cos_ptr + HALF + offs).to(tl.float32)
    s_lo = tl.load(sin_ptr + offs).to(tl.float32)
    s_hi = tl.load(sin_ptr + HALF + offs).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    out_lo = (lo * c_lo).to(dtype).to(tl.float32) + (-hi * s_lo).to(dtype).to(tl.float32)
    out_hi = (hi * c_hi).to(dtype).to(tl.float32) + (lo * s_hi).to(dtype).to(tl.float32)
    tl.store(out_ptr + offs, out_lo.to(dtype))
    tl.store(out_ptr + HALF + offs, out_hi.to(dtype))


@triton.jit
def rotary_qk_kernel(
    # q [B, HQ, T, D], k and v [B, HK, T, D] (any strides but a contiguous last dim); cos, sin [B, T, D]; positions
    # int64 [T] (INTO_CACHE); q_out [B, HQ, T, D] contiguous; k_out, v_out: [B, HK, T, D], or with INTO_CACHE the
    # caches [B, HK, S, D] whose row positions[t] takes token t
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_out_ptr, v_out_ptr,
    T, HQ, HK,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_t, ss_b, ss_t,
    sko_b, sko_h, sko_t, svo_b, svo_h, svo_t,
    HALF: tl.constexpr, INTO_CACHE: tl.constexpr,
):
    """Program (b * T + t, h): token t's query head h (h < HQ), key head h - HQ (rotated), or with INTO_CACHE
    value head h - HQ - HK (copied)."""
    bt, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, t = bt // T, bt % T
    row = tl.load(pos_ptr + t) if INTO_CACHE else t  # where token t goes in k_out / v_out
    cos, sin = cos_ptr + b * sc_b + t * sc_t, sin_ptr + b * ss_b + t * ss_t
    if h < HQ:
        _rotate_half(q_ptr + b * sq_b + h * sq_h + t * sq_t, q_out_ptr + ((b * HQ + h) * T + t) * (2 * HALF),
                     cos, sin, HALF)
    elif h < HQ + HK:
        h = h - HQ
        _rotate_half(k_ptr + b * sk_b + h * sk_h + t * sk_t, k_out_ptr + b * sko_b + h * sko_h + row * sko_t,
                     cos, sin, HALF)
    else:
        h = h - HQ - HK
        offs = tl.arange(0, 2 * HALF)
        tl.store(v_out_ptr + b * svo_b + h * svo_h + row * svo_t + offs,
                 tl.load(v_ptr + b * sv_b + h * sv_h + t * sv_t + offs))


@triton.jit
def silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = silu(gate) * up over n contiguous elements, silu rounded before the product as F.silu rounds it."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + offs, (silu * u).to(dtype), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., D] as rows [R, D] with a contiguous last dim (a view when the strides allow)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _norm_warps(D: int) -> int:
    return 4 if D <= 2048 else 8 if D <= 8192 else 16


def rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                    delta: torch.Tensor | None = None, total: torch.Tensor | None = None) -> Launch:
    """The launch writing out (and total = x + delta, with delta): x, delta, out, total rows [R, D] with a
    contiguous last dim; grid (R,)."""
    (R, D), has_delta = x.shape, delta is not None
    d, t = (delta, total) if has_delta else (x, x)
    args = (x, d, t, weight, out, D, x.stride(0), d.stride(0), t.stride(0), out.stride(0), float(eps))
    block = triton.next_power_of_2(D)
    kwargs = dict(HAS_DELTA=has_delta, BLOCK=block, num_warps=_norm_warps(D), num_stages=1)
    return Launch(rms_norm_kernel, (R,), args, kwargs, Config(1, block, 1, num_warps=_norm_warps(D)), out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """RMSNorm of x [..., D] (bf16 / fp16, weight [D] of the same dtype): out [..., D], or with `delta` (x's shape
    and dtype) the pair (x + delta, norm(x + delta)), one launch."""
    D = x.shape[-1]
    if weight.shape != (D,) or weight.dtype != x.dtype or (delta is not None and
                                                          (delta.shape != x.shape or delta.dtype != x.dtype)):
        raise ValueError(f"rms_norm: x {list(x.shape)} {x.dtype}, weight {list(weight.shape)} {weight.dtype}"
                         + (f", delta {list(delta.shape)} {delta.dtype}" if delta is not None else "")
                         + ": weight must be [D] and delta like x, in x's dtype")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if delta is not None else None
    if x.numel():
        rms_norm_launch(_rows(x), weight.contiguous(), eps, out.view(-1, D),
                        None if delta is None else _rows(delta), None if total is None else total.view(-1, D))()
    return out if delta is None else (total, out)


def rotary_qk_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
                     k_out: torch.Tensor, v: torch.Tensor | None = None, v_out: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None) -> Launch:
    """The launch writing q_out (contiguous) and k_out from q [B, HQ, T, D], k [B, HK, T, D], cos, sin [B, T, D]
    (each with a contiguous last dim); with `positions` (int64 [T]) k_out and v_out are caches [B, HK, S, D] that
    take rotated k and v at rows `positions`.  Grid (B * T, HQ + HK, or HQ + 2 HK with v), one warp per head."""
    (B, HQ, T, D), HK = q.shape, k.shape[1]
    into_cache = positions is not None
    v, v_out, positions = (v, v_out, positions) if into_cache else (k, k_out, k)
    args = (q, k, v, cos, sin, positions, q_out, k_out, v_out, T, HQ, HK, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), *k_out.stride()[:3],
            *v_out.stride()[:3])
    grid = (B * T, HQ + (2 if into_cache else 1) * HK)
    return Launch(rotary_qk_kernel, grid, args, dict(HALF=D // 2, INTO_CACHE=into_cache, num_warps=1, num_stages=1),
                  Config(1, D, 1, num_warps=1), q_out)


def _check_rotary(op: str, q, k, cos, sin, extra: str = "") -> None:
    (B, _, T, D), HK = q.shape, k.shape[1]
    if k.shape != (B, HK, T, D) or cos.shape != (B, T, D) or sin.shape != (B, T, D) or D % 2 \
            or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"{op}: q {list(q.shape)}, k {list(k.shape)}, cos {list(cos.shape)}, sin"
                         f" {list(sin.shape)}{extra}: need [B, H, T, D], [B, H_kv, T, D], [B, T, D] in one dtype,"
                         " D / 2 a power of two")


def _last_dim_contiguous(*tensors: torch.Tensor):
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`QKRotation` in one launch: q [B, HQ, T, D], k [B, HK, T, D] (bf16 / fp16) rotated by cos, sin [B, T, D]
    of the same dtype; returns new contiguous (q, k)."""
    _check_rotary("rotary_qk", q, k, cos, sin)
    q, k, cos, sin = _last_dim_contiguous(q, k, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] * q.shape[2]:
        rotary_qk_launch(q, k, cos, sin, q_out, k_out)()
    return q_out, k_out


def rotary_qk_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`QKRotation.into_cache` in one launch: q and k rotated as `rotary_qk` does, rotated k and v [B, HK, T, D]
    written into k_cache and v_cache [B, HK, S, D] at rows `positions` (int64 [T], each < S: not checked on the
    device); returns the rotated q (new, contiguous)."""
    (B, HK, T, D), S = k.shape, k_cache.shape[2]
    cache_shape = (B, HK, S, D)
    if v.shape != k.shape or v.dtype != k.dtype or k_cache.shape != cache_shape or v_cache.shape != cache_shape \
            or {k_cache.dtype, v_cache.dtype} != {k.dtype} or positions.shape != (T,) \
            or positions.dtype != torch.int64 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"rotary_qk_into_cache: v {list(v.shape)} {v.dtype}, caches {list(k_cache.shape)}"
                         f" {k_cache.dtype} and {list(v_cache.shape)} {v_cache.dtype}, positions"
                         f" {list(positions.shape)} {positions.dtype}: need v like k, caches [B, H_kv, S, D] in its"
                         " dtype with a contiguous last dim, positions int64 [T]")
    _check_rotary("rotary_qk_into_cache", q, k, cos, sin)
    q, k, v, cos, sin = _last_dim_contiguous(q, k, v, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B * T:
        rotary_qk_launch(q, k, cos, sin, q_out, k_cache, v, v_cache, positions.contiguous())()
    return q_out


def silu_mul_launch(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> Launch:
    """The launch writing out = silu(gate) * up, all three contiguous and of one size."""
    n = gate.numel()
    return Launch(silu_mul_kernel, (triton.cdiv(n, SILU_BLOCK),), (gate, up, out, n),
                  dict(BLOCK=SILU_BLOCK, num_warps=4, num_stages=1), Config(1, SILU_BLOCK, 1), out)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype (bf16 / fp16), one launch; a new contiguous tensor."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {list(gate.shape)} {gate.dtype} and up {list(up.shape)} {up.dtype} differ")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        silu_mul_launch(gate, up, out)()
    return out

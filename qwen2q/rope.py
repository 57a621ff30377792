"""Rotary position embeddings: plain RoPE and YaRN, as inverse frequencies plus a cos/sin scale.

YaRN (Peng et al. 2023) blends interpolated and extrapolated frequencies with a linear ramp between
the dimensions that make `beta_fast` and `beta_slow` rotations over the original window, and scales
cos/sin by `0.1 * ln(factor) + 1`.  The arithmetic follows transformers' `_compute_yarn_parameters`
so that logits match it.
"""
from __future__ import annotations

import math

import torch

from qwen2q.config import RopeConfig


def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """fp32 [head_dim // 2]: 1 / theta^(2i / head_dim)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def yarn_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """YaRN's fp32 [head_dim // 2] inverse frequencies and its cos/sin scale."""
    factor, base, orig = rope.factor, rope.theta, rope.original_max_position_embeddings
    scale = rope.attention_factor
    if scale is None:
        scale = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, float(scale)


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin [B, T, head_dim] in fp32 for given positions, then casts to the activations' dtype."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.rope = rope
        plain = default_inv_freq(rope.theta, head_dim)
        if rope.rope_type == "yarn":
            scaled, self.scaled_attention_factor = yarn_inv_freq(rope, head_dim)
        else:
            scaled, self.scaled_attention_factor = plain, 1.0
        self.register_buffer("inv_freq", scaled, persistent=False)
        self.register_buffer("plain_inv_freq", plain, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, seq_end: int | None = None):
        """positions: int64 [B, T].  seq_end: total length so far, used by dynamic YaRN only."""
        inv_freq, scale = self.inv_freq, self.scaled_attention_factor
        if self.rope.dynamic and seq_end is not None and seq_end <= self.rope.original_max_position_embeddings:
            inv_freq, scale = self.plain_inv_freq, 1.0
        freqs = positions[..., None].float() * inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class QKRotation(torch.nn.Module):
    """Rotary embeddings on an attention's queries and keys: (q, k) [B, H, T, D] and [B, H_kv, T, D] -> the same
    shapes, rotated by cos, sin [B, T, D] (`apply_rotary`).  A module so that one launch for both can replace it
    (`qwen2q.fused`)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def into_cache(self, q, k, v, cos, sin, cache, layer: int, positions: torch.Tensor):
        """The static decode path: rotate q and k, write k and v into `cache` (a `qwen2q.model.KVCache`) for
        `layer` at `positions` (int64 [T] on the device); returns (q rotated, the layer's whole key and value
        buffers [B, H_kv, max_len, D])."""
        q, k = self(q, k, cos, sin)
        k, v = cache.write_at(layer, k, v, positions)
        return q, k, v

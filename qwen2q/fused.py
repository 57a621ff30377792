"""A decoder layer's small steps as one launch each on CUDA (`qwen2q.kernels.layer_ops`, `.decode_attention`),
swapped into a model the way quantized linears are: the model stays plain PyTorch and knows nothing of them.

`use_fused_ops(model)` replaces every RMSNorm, QKRotation, CacheAttention and GatedSiLU by its subclass here; the
loader calls it for models loaded onto CUDA.  Each subclass runs its kernel for bf16 / fp16 CUDA tensors and its PyTorch parent
otherwise (CPU, fp32, or QWEN2Q_KERNELS=reference), so a model moved off the GPU still runs.  Per layer of a
decode step this is 5 launches (attention included) where PyTorch makes about 40 (`layer_ops`' and
`decode_attention`'s docstrings).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from qwen2q.kernels import ENV
from qwen2q.model import CacheAttention, GatedSiLU, RMSNorm
from qwen2q.rope import QKRotation

_DTYPES = (torch.bfloat16, torch.float16)


def _layer_ops():
    from qwen2q.kernels import layer_ops  # imports triton: only when a CUDA tensor comes

    return layer_ops


def _kernels_take(t: torch.Tensor, *params: torch.Tensor) -> bool:
    """True when the fused kernels run for activations `t` (the same switch as the quantized matmuls'): bf16 / fp16
    on CUDA, and nothing autograd must see (the kernels have no backward; a loaded model's parameters need none)."""
    if torch.is_grad_enabled() and (t.requires_grad or any(p.requires_grad for p in params)):
        return False
    return t.is_cuda and t.dtype in _DTYPES and os.environ.get(ENV, "auto").lower() != "reference"


class FusedRMSNorm(RMSNorm):
    """RMSNorm, and the residual add before it, in one launch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernels_take(x, self.weight) and self.weight.dtype == x.dtype:
            return _layer_ops().rms_norm(x, self.weight, self.eps)
        return super().forward(x)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _kernels_take(x, self.weight, delta) and self.weight.dtype == x.dtype == delta.dtype \
                and x.shape == delta.shape:
            return _layer_ops().rms_norm(x, self.weight, self.eps, delta)
        return super().add_and_norm(x, delta)


def _rotary_takes(q, k, cos, sin) -> bool:
    half = q.shape[-1] // 2
    return _kernels_take(q, k, cos, sin) and len({q.dtype, k.dtype, cos.dtype, sin.dtype}) == 1 \
        and half & (half - 1) == 0


class FusedQKRotation(QKRotation):
    """Rotary embeddings on q and k in one launch, with the KV cache write on the static decode path."""

    def forward(self, q, k, cos, sin):
        if _rotary_takes(q, k, cos, sin):
            return _layer_ops().rotary_qk(q, k, cos, sin)
        return super().forward(q, k, cos, sin)

    def into_cache(self, q, k, v, cos, sin, cache, layer: int, positions: torch.Tensor):
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        if _rotary_takes(q, k, cos, sin) and v.dtype == k_cache.dtype == v_cache.dtype == k.dtype:
            return _layer_ops().rotary_qk_into_cache(q, k, v, cos, sin, k_cache, v_cache, positions), k_cache, v_cache
        return super().into_cache(q, k, v, cos, sin, cache, layer, positions)


class FusedGatedSiLU(GatedSiLU):
    """silu(gate) * up in one launch."""

    def forward(self, gate, up):
        if _kernels_take(gate, up) and gate.dtype == up.dtype and gate.shape == up.shape:
            return _layer_ops().silu_mul(gate, up)
        return super().forward(gate, up)


class FusedCacheAttention(CacheAttention):
    """The static path's attention in one launch (two past 512 cache positions) that reads only the positions each
    query sees (`kernels.decode_attention`), where SDPA's grouped-query attention under a mask runs its math
    backend over the whole cache."""

    def forward(self, q, k, v, mask, positions, window):
        if _kernels_take(q, k, v) and q.dtype == k.dtype == v.dtype and _decode_attention().applies(q, k):
            return _decode_attention().decode_attention(q, k, v, positions, window)
        return super().forward(q, k, v, mask, positions, window)


def _decode_attention():
    from qwen2q.kernels import decode_attention  # imports triton: only when a CUDA tensor comes

    return decode_attention


def _fused(module: nn.Module) -> nn.Module | None:
    """The fused replacement of `module` (sharing its parameters), or None where there is none."""
    if type(module) is RMSNorm:
        fused = FusedRMSNorm(module.weight.shape[0], module.eps)
        fused.weight = module.weight
        return fused
    if type(module) is QKRotation:
        return FusedQKRotation()
    if type(module) is GatedSiLU:
        return FusedGatedSiLU()
    if type(module) is CacheAttention:
        return FusedCacheAttention()
    return None


def use_fused_ops(model: nn.Module) -> int:
    """Swap `model`'s RMSNorms, rotations, cache attentions and gated activations for the fused ones, in place;
    returns how many.
    Parameters are shared, not copied, so the state dict and its keys do not change."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if (fused := _fused(module)) is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
            swapped += 1
    return swapped

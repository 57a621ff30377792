"""A decoder layer's small steps as one launch each on CUDA (`qwen2q.kernels.layer_ops`, `.decode_attention`),
swapped into a model the way quantized linears are: the model stays plain PyTorch and knows nothing of them.

`use_fused_ops(model)` replaces every RMSNorm, QKRotation, CacheAttention and GatedSiLU by its subclass here, and
every Projections whose int4 linears can be grouped (q, k, v; gate, up: one launch each); the loader calls it for
models loaded onto CUDA.  Each subclass runs its kernel for bf16 / fp16 CUDA tensors and its PyTorch parent
otherwise (CPU, fp32, or QWEN2Q_KERNELS=reference), so a model moved off the GPU still runs.  Per layer of a
decode step this is 5 launches (attention included) where PyTorch makes about 40 (`layer_ops`' and
`decode_attention`'s docstrings), and for int4 4 matmul launches instead of 7 (kernels/NOTES.md, section 10).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from qwen2q import kernels
from qwen2q.kernels import ENV, int4_native
from qwen2q.model import CacheAttention, GatedSiLU, Projections, RMSNorm
from qwen2q.qlinear import QuantLinear
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


@dataclass(frozen=True)
class _Group:
    """Linears grouped for one launch: their held forms as grouped (a linear prepared again since has left the
    group), the concatenated form and bias, and each linear's output columns [start, end)."""

    linears: tuple[nn.Module, ...]
    prepared: tuple
    native: int4_native.Int4Native  # [sum of N, K]
    bias: torch.Tensor | None
    columns: tuple[tuple[int, int], ...]


class FusedProjections(Projections):
    """int4 linears of one input (q, k, v; gate, up) that hold the GEMV layout on CUDA, in one launch: their words
    are concatenated once and each linear then holds a view of its rows (no second copy); the zeros, scales and
    biases are copied into the group (3 bytes per 128 weights at group 128).  Every M runs on the concatenation (the
    GEMV, int4_decode, dequantize + cuBLAS), so a decode step makes 2 launches a layer fewer, and k / v (N = 512,
    too few bytes to stream alone) ride with q.  Other formats, devices and linears prepared again: the parent."""

    def __init__(self, *names: str):
        super().__init__(*names)
        self._group: _Group | None = None  # not a buffer: never moved, cast or saved

    def group(self, linears: tuple[nn.Module, ...]) -> bool:
        """Group `linears` when each holds an int4 GEMV layout of one K and group size on one device; True if so."""
        forms = [getattr(m, "prepared", None) for m in linears]
        if len(linears) < 2 or not all(isinstance(m, QuantLinear) and isinstance(p, int4_native.Int4Native)
                                       and "words" in m._held for m, p in zip(linears, forms)):
            return False
        if len({(p.in_features, p.group_size, p.words.device, m.dtype) for m, p in zip(linears, forms)}) != 1:
            return False
        words = torch.cat([p.words for p in forms])
        native = int4_native.Int4Native(words, torch.cat([p.zeros for p in forms], dim=1),
                                        torch.cat([p.scales for p in forms], dim=1))
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias if m.bias is not None else words.new_zeros(p.out_features, dtype=m.dtype)
                              for m, p in zip(linears, forms)])
        ends = torch.tensor([p.out_features for p in forms]).cumsum(0).tolist()
        columns = tuple(zip([0, *ends[:-1]], ends))
        for m, (start, end) in zip(linears, columns):
            m.share_held("words", words[start:end])
        self._group = _Group(tuple(linears), tuple(m.prepared for m in linears), native, bias, columns)
        return True

    def _current(self, x: torch.Tensor, linears) -> _Group | None:
        """The group, if it still stands for `linears` and serves x; a group whose linears were prepared again (a
        move, a loaded state dict) is dropped."""
        g = self._group
        if g is None:
            return None
        if any(m.prepared is not p for m, p in zip(g.linears, g.prepared)):
            self._group = None
            return None
        if linears != g.linears or any(m._forced for m in linears) or x.device != g.native.words.device \
                or x.dtype != linears[0].dtype or not _kernels_take(x):
            return None
        return g

    def forward(self, x, *linears):
        g = self._current(x, linears)
        if g is None:
            return super().forward(x, *linears)
        first = linears[0]
        kind = first.kind if first._kind_for == (x.device, x.dtype) else None
        y = kernels.linear(first.FORMAT, x, None, g.bias, g.native, kind)
        return tuple(y[..., start:end] for start, end in g.columns)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if self._group is not None and any(m.prepared is not p for m, p in zip(self._group.linears,
                                                                               self._group.prepared)):
            self._group = None  # the linears came first (registered before this module) and gave their form up
        return result


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
    """Swap `model`'s RMSNorms, rotations, cache attentions and gated activations for the fused ones, and group the
    int4 linears of each Projections (q, k, v; gate, up) that hold the GEMV layout, in place; returns how many
    modules were swapped or grouped.  Parameters are shared, not copied, so the state dict and its keys do not
    change."""
    swapped = 0
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(module) is Projections:
            fused = FusedProjections(*module.names)
            if not fused.group(tuple(getattr(parent, n) for n in module.names)):
                continue
        elif (fused := _fused(module)) is None:
            continue
        setattr(parent, child, fused)
        swapped += 1
    return swapped

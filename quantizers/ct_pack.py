"""compressed-tensors "pack-quantized" integer weights: what llm-compressor writes for W4A16 and W8A16 and
what vLLM serves (Machete/Marlin on GPUs), read by transformers through the compressed-tensors package.

For a weight W [out_features N, in_features K] with groups of G consecutive input channels (G = K: one
group per row, the "channel" strategy), `bits` b in {4, 8}, codes in [-2^(b-1), 2^(b-1) - 1]:

    W[n, k] ~= (q[n, k] - z[n, g]) * s[n, g]          g = k // G;  z = 0 when symmetric

Round-to-nearest follows compressed-tensors' min-max observer: the range always holds 0,
    symmetric:  s = max(|min|, |max|) / ((2^b - 1) / 2)
    asymmetric: s = (max - min) / (2^b - 1),  z = clamp(round(-2^(b-1) - min / s), -2^(b-1), 2^(b-1) - 1)
    q = clamp(round(W / s16) + z, -2^(b-1), 2^(b-1) - 1)
where z comes from the fp32 s, as compressed-tensors computes it, and the codes from s16, s rounded to
fp16 (its stored dtype), so that dequantizing the file gives exactly the grid the codes were chosen on;
round() is half-to-even.

Stored tensors (module name prefix, then):
    weight_packed      int32 [N, K * b / 32]   codes + 2^(b-1), 32/b per word, element i at bits b*i
    weight_scale       fp16  [N, K / G]
    weight_zero_point  int32 [N * b / 32, K / G]   asymmetric only: z + 2^(b-1) packed the same way along N
    weight_shape       int64 [2] = [N, K]
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .checks import check_weight
from .format import Format, Grid, TensorSpec

GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """packed int32 [N, K*b/32]; scale fp16 [N, K/G]; zero int32 [N*b/32, K/G] or None; bits b."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    shape: tuple[int, int]


def _limits(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [rows, cols] (cols * bits % 32 == 0) -> int32 [rows, cols * bits / 32], each code offset
    by 2^(bits-1) and element i of a word at bits bits*i (compressed-tensors' pack_to_int32)."""
    per = 32 // bits
    rows, cols = codes.shape
    unsigned = (codes.to(torch.int64) + (1 << (bits - 1))).view(rows, cols // per, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
    words = (unsigned << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: int32 [rows, w] -> signed int8 codes [rows, w * 32 / bits]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    fields = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)  # >> is arithmetic: the mask drops the sign
    return (fields.reshape(packed.shape[0], -1) - (1 << (bits - 1))).to(torch.int8)


def grid(low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp16, zero fp32 whole numbers) for groups with minimum `low` and maximum `high`."""
    qmin, qmax = _limits(bits)
    low, high = low.float().clamp(max=0), high.float().clamp(min=0)
    if symmetric:
        scale = (torch.maximum(-low, high) / ((qmax - qmin) / 2)).clamp(min=1e-8).to(torch.float16)
        return scale, torch.zeros_like(low)
    scale = ((high - low) / (qmax - qmin)).clamp(min=1e-8)
    zero = torch.round(qmin - low / scale).clamp(qmin, qmax)  # from the fp32 scale, as compressed-tensors does
    return scale.to(torch.float16), zero


def codes_on(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """clamp(round(W / s) + z) as fp32; scale and zero broadcast against weight."""
    qmin, qmax = _limits(bits)
    return (torch.round(weight.float() / scale.float()) + zero).clamp(qmin, qmax)


class PackedGrid(Grid):
    """Each row's grid over `group_size` columns: (scale fp16 [N], zero fp32 [N])."""

    def __init__(self, group_size: int, bits: int, symmetric: bool):
        self.group_size, self.bits, self.symmetric = group_size, bits, symmetric

    def fit(self, block, shrink=1.0):
        scale, zero = grid(block.amin(dim=1) * shrink, block.amax(dim=1) * shrink, self.bits, self.symmetric)
        if not torch.isfinite(scale).all():
            raise ValueError("weight range exceeds what float16 scales can hold")
        return scale, zero

    def snap(self, values, grid_):
        scale, zero = (t[:, None] for t in grid_) if values.dim() == 2 else grid_
        return (codes_on(values, scale, zero, self.bits) - zero) * scale.float()

    def encode(self, dequantized, grids):
        scale = torch.stack([s for s, _ in grids], dim=1)  # [N, K / G]
        zero = torch.stack([z for _, z in grids], dim=1)
        return _store(dequantized, scale, zero, self.bits, self.symmetric)


def _store(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> PackedWeight:
    """Weight [N, K] on per-group scale fp16 [N, K/G] and zero [N, K/G] -> PackedWeight."""
    n, k = weight.shape
    g = k // scale.shape[1]
    codes = codes_on(weight.float().view(n, -1, g), scale[..., None], zero[..., None], bits).view(n, k)
    packed_zero = None if symmetric else pack(zero.t().to(torch.int8), bits).t().contiguous()
    return PackedWeight(pack(codes.to(torch.int8), bits), scale.contiguous(), packed_zero, bits, (n, k))


def _skip_as_ignore(entry: str) -> str:
    """A qwen2q skip entry (a name, dotted suffix or prefix) as a compressed-tensors ignore entry."""
    if entry == "lm_head":
        return entry
    return "re:^(.*\\.)?" + re.escape(entry) + "(\\..*)?$"


class CompressedTensorsPack(Format):
    """compressed-tensors pack-quantized integer weights (W4A16 group-wise, W8A16 per channel)."""

    name, module_name, kernel = "ct-pack", "PackedIntLinear", "ct_pack_linear"  # CPU backend only (no Triton op)
    loaded_by = "qwen2q, vLLM and transformers with compressed-tensors"
    defaults = {"bits": 4, "group_size": 128, "symmetric": True}  # group_size 0: one scale per row

    def check_params(self, params):
        if params["bits"] not in BITS:
            raise ValueError(f"bits {params['bits']} is not supported; use one of {BITS}")
        if params["group_size"] not in (0, *GROUP_SIZES):
            raise ValueError(f"group size {params['group_size']} is not supported; use one of {GROUP_SIZES} "
                             "or 0 (one scale per output row)")
        if not isinstance(params["symmetric"], bool):
            raise ValueError(f"symmetric must be true or false, not {params['symmetric']!r}")

    def _group(self, params, in_features: int) -> int:
        return params["group_size"] or in_features

    def check_shape(self, out_features, in_features, params):
        g, per = self._group(params, in_features), 32 // params["bits"]
        if in_features % g or in_features % per:
            raise ValueError(f"in_features={in_features} is not a multiple of the group size {g} and of {per}")
        if not params["symmetric"] and out_features % per:
            raise ValueError(f"out_features={out_features} is not a multiple of {per} (zero points pack along it)")

    def stored_tensors(self, name, out_features, in_features, params):
        self.check_shape(out_features, in_features, params)
        b, groups = params["bits"], in_features // self._group(params, in_features)
        out = {f"{name}.weight_packed": TensorSpec((torch.int32,), ((out_features, in_features * b // 32),)),
               f"{name}.weight_scale": TensorSpec((torch.float16, torch.bfloat16, torch.float32),
                                                  ((out_features, groups),)),
               f"{name}.weight_shape": TensorSpec((torch.int64, torch.int32), ((2,),))}
        if not params["symmetric"]:
            out[f"{name}.weight_zero_point"] = TensorSpec((torch.int32,), ((out_features * b // 32, groups),))
        return out

    def quantize(self, weight, params):
        check_weight(weight)
        n, k = weight.shape
        self.check_shape(n, k, params)
        g = self._group(params, k)
        groups = weight.detach().view(n, k // g, g)
        scale, zero = grid(groups.amin(-1), groups.amax(-1), params["bits"], params["symmetric"])
        if not torch.isfinite(scale).all():
            raise ValueError("weight range exceeds what float16 scales can hold")
        return _store(weight, scale, zero, params["bits"], params["symmetric"])

    def to_state_dict(self, q, name):
        out = {f"{name}.weight_packed": q.packed, f"{name}.weight_scale": q.scale,
               f"{name}.weight_shape": torch.tensor(q.shape, dtype=torch.int64)}
        if q.zero is not None:
            out[f"{name}.weight_zero_point"] = q.zero
        return out

    def from_state_dict(self, tensors: Mapping[str, torch.Tensor], name):
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        zero, shape = tensors.get(f"{name}.weight_zero_point"), tensors[f"{name}.weight_shape"]
        if packed.dtype != torch.int32 or packed.dim() != 2 or scale.dim() != 2 or shape.numel() != 2:
            raise ValueError(f"{name}: compressed-tensors tensors do not fit together")
        n, k = (int(v) for v in shape.tolist())
        bits = packed.shape[1] * 32 // k if k else 0
        if bits not in BITS or packed.shape != (n, k * bits // 32) or scale.shape[0] != n or k % scale.shape[1]:
            raise ValueError(f"{name}: weight_packed {list(packed.shape)}, weight_scale {list(scale.shape)} and "
                             f"weight_shape {[n, k]} do not fit together")
        if zero is not None and (zero.dtype != torch.int32 or zero.shape != (n * bits // 32, scale.shape[1])):
            raise ValueError(f"{name}: weight_zero_point {list(zero.shape)} does not fit the weight")
        return PackedWeight(packed, scale, zero, bits, (n, k))

    def shape(self, q):
        return q.shape

    def dequantize(self, q, dtype):
        n, k = q.shape
        codes = unpack(q.packed, q.bits).float()
        zero = unpack(q.zero.t().contiguous(), q.bits).t().float() if q.zero is not None else 0.0
        g = k // q.scale.shape[1]
        scale = q.scale.float().repeat_interleave(g, dim=1)
        zero = zero.repeat_interleave(g, dim=1) if q.zero is not None else 0.0
        return ((codes - zero) * scale).to(dtype)

    def scale_group(self, params, in_features):
        return self._group(params, in_features)

    def grid(self, params, in_features):
        return PackedGrid(self._group(params, in_features) if in_features else 1, params["bits"], params["symmetric"])

    def to_config(self, params, skip, compute_dtype):
        return self.groups_to_config([(params, ["Linear"])], skip)

    def groups_to_config(self, groups, skip):
        """One compressed-tensors `quantization_config` with a config group per (params, targets): targets are
        module names, "re:" patterns or "Linear" (every linear not named by another group)."""
        config_groups = {}
        for i, (params, targets) in enumerate(groups):
            g = params["group_size"]
            weights = {"num_bits": params["bits"], "type": "int", "symmetric": params["symmetric"],
                       "group_size": g or None, "strategy": "group" if g else "channel", "block_structure": None,
                       "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
            config_groups[f"group_{i}"] = {"targets": list(targets), "weights": weights, "input_activations": None,
                                           "output_activations": None, "format": "pack-quantized"}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": config_groups, "ignore": [_skip_as_ignore(s) for s in skip], "kv_cache_scheme": None,
                "global_compression_ratio": None, "sparsity_config": {}}

    def reads_config(self, config):
        return config.get("quant_method") == "compressed-tensors"

    def from_config(self, config):
        groups, skip = self.groups_from_config(config)
        if len(groups) != 1 or groups[0][1] not in (["Linear"], ["re:.*"]):
            raise ValueError("this compressed-tensors checkpoint has several config groups; read it as a recipe")
        return groups[0][0], skip, "bfloat16"

    def groups_from_config(self, config):
        """([(params, targets)] per config group, skip) of a compressed-tensors `quantization_config`."""
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        out = []
        for group in groups.values():
            fmt = group.get("format") or config.get("format")
            w = group.get("weights") or {}
            if fmt != "pack-quantized" or w.get("type") != "int" or group.get("input_activations"):
                raise ValueError(f"compressed-tensors {fmt} with weights {w.get('type')} and activations "
                                 f"{group.get('input_activations')} is not supported; qwen2q reads pack-quantized "
                                 "integer weights with unquantized activations (W4A16, W8A16)")
            targets = group.get("targets")
            if not isinstance(targets, list) or not targets or w.get("strategy") not in ("group", "channel") \
                    or w.get("actorder") not in (None, "static", "weight"):
                raise ValueError(f"compressed-tensors targets {targets}, strategy {w.get('strategy')} "
                                 f"and actorder {w.get('actorder')} are not supported")
            params = {"bits": w.get("num_bits"), "group_size": w.get("group_size") or 0 if w.get("strategy") == "group"
                      else 0, "symmetric": bool(w.get("symmetric"))}
            self.check_params(params)
            out.append((params, targets))
        named_head = any("lm_head" in targets for _, targets in out)  # a quantized lm_head (qwen2q's mixed output)
        return out, tuple(config.get("ignore") or ()) + (() if named_head else ("lm_head",))


FORMAT = CompressedTensorsPack()

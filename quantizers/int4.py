"""Asymmetric group-wise uint4 in the AutoAWQ "GEMM" layout (`WQLinear_GEMM`, read by transformers and vLLM).

This module owns the layout. For a weight W [out_features, in_features] and groups of G = group_size
consecutive input channels (g = k // G for input channel k), round-to-nearest gives

    scale[g, n] = max(max_k W[n, k] - min_k W[n, k], 1e-5) / 15     over the G inputs k of group g
    zero[g, n]  = clamp(-round(min_k W[n, k] / scale[g, n]), 0, 15)
    q[k, n]     = clamp(round(W[n, k] / scale[g, n]) + zero[g, n], 0, 15)
    W[n, k]    ~= (q[k, n] - zero[g, n]) * scale[g, n]

with scales rounded to fp16 (their stored dtype) before zeros and codes are computed, and round()
half-to-even. Stored tensors:

    qweight  int32 [in_features, out_features / 8]      q packed along the output dimension
    qzeros   int32 [in_features / G, out_features / 8]  zero packed the same way
    scales   fp16  [in_features / G, out_features]

Packing: nibble i (bits 4i..4i+3) of packed column c holds column 8c + NIBBLE_COLUMNS[i].
"""
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .checks import SERIAL_VALUES, check_weight, round_small_, serial
from .format import Grid, LayoutFormat, TensorSpec

GROUP_SIZES = (32, 64, 128)
NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)
PACK_FACTOR = len(NIBBLE_COLUMNS)  # 4-bit codes per int32
_MAX_CODE = 15


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """One AWQ-GEMM int4 weight (G = group_size).

    qweight: int32 [in_features, out_features / 8]
    qzeros:  int32 [in_features / G, out_features / 8]
    scales:  fp16  [in_features / G, out_features]
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[0]


def check_shape(in_features: int, out_features: int, group_size: int) -> None:
    """Raise ValueError, naming the sizes and what would work, unless the layout can hold this weight."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; use one of {GROUP_SIZES}")
    if in_features % group_size:
        fitting = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"group sizes that divide it: {fitting}" if fitting else f"pad it to a multiple of {group_size}"
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}; {hint}")
    if out_features % PACK_FACTOR:
        padded = -(-out_features // PACK_FACTOR) * PACK_FACTOR
        raise ValueError(
            f"out_features={out_features} is not a multiple of {PACK_FACTOR} (eight 4-bit columns share one"
            f" int32); pad it to {padded}"
        )




def grid(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The round-to-nearest grid of groups with minimum `low` and maximum `high` (same shape, any float).

    Returns (scale fp16, zero fp32 whole numbers 0..15), each of low's shape; a range too large for
    fp16 gives an infinite scale, which callers that store it must refuse.
    """
    scale = ((high.float() - low.float()).clamp(min=1e-5) / _MAX_CODE).to(torch.float16)
    return scale, (-torch.round(low.float() / scale.float())).clamp(0, _MAX_CODE)


def snap(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round `weight` to its grid point and dequantize, fp32; scale/zero broadcast against weight."""
    s = scale.float()
    return ((torch.round(weight.float() / s) + zero).clamp(0, _MAX_CODE) - zero) * s


def compute_scales_zeros(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zeros for weight [out_features, in_features].

    Returns (scales fp16 [in_features / G, out_features], zeros uint8 [in_features / G, out_features]).
    Raises ValueError for unsupported sizes, NaN/Inf, or a weight range too large for fp16 scales.
    """
    check_weight(weight)
    out_features, in_features = weight.shape
    check_shape(in_features, out_features, group_size)
    # min and max are exact in the weight's own dtype: no fp32 copy of the weight
    groups = weight.detach().view(out_features, in_features // group_size, group_size)
    scales, zeros = grid(groups.amin(dim=-1), groups.amax(dim=-1))
    if not torch.isfinite(scales).all():
        raise ValueError("weight range exceeds what float16 scales can hold (max - min > 15 * 65504)")
    return scales.t().contiguous(), zeros.t().to(torch.uint8).contiguous()


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [rows, cols] (integer dtype, 0..15, cols % 8 == 0) into int32 [rows, cols / 8]."""
    if codes.dim() != 2 or codes.shape[1] % PACK_FACTOR or codes.is_floating_point():
        raise ValueError(f"codes must be integer [rows, cols], cols % 8 == 0; got {codes.dtype} {list(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() > _MAX_CODE):
        raise ValueError(f"codes must lie in 0..15, got {codes.min().item()}..{codes.max().item()}")
    rows, cols = codes.shape
    nibbles = codes.long().view(rows, cols // PACK_FACTOR, PACK_FACTOR)[:, :, list(NIBBLE_COLUMNS)]
    shifts = torch.arange(0, 32, 4, device=codes.device)
    words = (nibbles << shifts).sum(dim=-1)  # 0 .. 2**32 - 1 in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `pack`: int32 [rows, cols / 8] -> uint8 codes [rows, cols]."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed must be int32 [rows, cols / 8], got {packed.dtype} {list(packed.shape)}")
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed[:, :, None] >> shifts) & 0xF  # >> is arithmetic on int32: the mask drops the sign
    columns = torch.empty_like(nibbles)
    columns[:, :, list(NIBBLE_COLUMNS)] = nibbles
    return columns.reshape(packed.shape[0], -1).to(torch.uint8)


def quantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> Int4Weight:
    """Quantize weight [out_features, in_features] with scales and zeros, both [in_features / G, out_features].

    scales are rounded to fp16 (the stored dtype) first and must be positive; zeros must be whole numbers
    in 0..15 (any dtype). G is in_features / scales.shape[0]. Raises ValueError on bad shapes or values.
    """
    check_weight(weight)
    out_features, in_features = weight.shape
    num_groups = scales.shape[0] if scales.dim() == 2 else 0
    fits = num_groups > 0 and in_features % num_groups == 0 and scales.shape[1] == out_features
    if not fits or scales.shape != zeros.shape:
        raise ValueError(
            f"scales and zeros must both be [in_features / group_size, {out_features}] for weight"
            f" {list(weight.shape)}, got {list(scales.shape)} and {list(zeros.shape)}"
        )
    group_size = in_features // num_groups
    check_shape(in_features, out_features, group_size)
    scales = scales.detach().to(torch.float16)
    if not (torch.isfinite(scales) & (scales > 0)).all():
        raise ValueError("scales must be positive and finite in float16")
    if ((zeros != torch.round(zeros.float())) | (zeros < 0) | (zeros > _MAX_CODE)).any():
        raise ValueError("zeros must be whole numbers in 0..15")
    if weight.device.type == "cpu" and sys.byteorder == "little":
        qweight = _quantize_pack(weight.detach(), scales, zeros)
    else:
        full_scales = scales.float().repeat_interleave(group_size, dim=0)
        full_zeros = zeros.float().repeat_interleave(group_size, dim=0)
        codes = (torch.round(weight.detach().float().t() / full_scales) + full_zeros).clamp(0, _MAX_CODE)
        qweight = pack(codes.to(torch.uint8))
    return Int4Weight(qweight, pack(zeros.to(torch.uint8)), scales.contiguous())


def _quantize_pack(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """pack(clamp(round(W^T / scale) + zero, 0, 15)) for weight [out, in], scales fp16 and zeros
    [in / G, out], computed with the same fp32 arithmetic on small blocks of 8k output rows (see checks.SERIAL_VALUES).

    Rows stay rows (no transposed division, no [in, out] scale/zero copies, no int64 nibbles): each block
    is divided by its groups' scales in place, then byte j of every packed word is written as
    code[8c + NIBBLE_COLUMNS[2j]] + 16 * code[8c + NIBBLE_COLUMNS[2j + 1]] into a [out / 8, in, 4] byte
    array, which is the int32 words (little-endian) transposed; one transpose gives [in, out / 8].
    """
    out_features, in_features = weight.shape
    num_groups = scales.shape[0]
    group_size = in_features // num_groups
    scale_rows = scales.float().t().contiguous()  # [out, in / G]
    zero_rows = zeros.float().t().contiguous()
    words = torch.empty(out_features // PACK_FACTOR, in_features, 4, dtype=torch.uint8)
    # blocks of 8k rows by a run of groups, each under SERIAL_VALUES values when the shapes allow
    rows = min(out_features, max(1, SERIAL_VALUES // in_features // PACK_FACTOR) * PACK_FACTOR)
    span = min(num_groups, max(1, SERIAL_VALUES // (rows * group_size)))
    x = torch.empty(rows, span, group_size)
    codes = torch.empty(rows, num_groups, group_size, dtype=torch.uint8)
    for s in range(0, out_features, rows):
        e = min(s + rows, out_features)
        source = weight[s:e].view(e - s, num_groups, group_size)
        for g in range(0, num_groups, span):
            h = min(g + span, num_groups)
            xs = x[: e - s, : h - g]
            xs.copy_(source[:, g:h])
            # |w / scale| beyond 64 ends at 0 or 15 whatever its rounding: clamping it first keeps the codes
            # and lets round_small_ round exactly
            round_small_(xs.div_(scale_rows[s:e, g:h, None]).clamp_(-64, 64))
            xs.add_(zero_rows[s:e, g:h, None]).clamp_(0, _MAX_CODE)
            codes[: e - s, g:h].copy_(xs)
        by_column = codes[: e - s].view(-1, PACK_FACTOR, in_features)
        for j in range(4):
            low, high = NIBBLE_COLUMNS[2 * j], NIBBLE_COLUMNS[2 * j + 1]
            torch.add(by_column[:, low], by_column[:, high], alpha=16,
                      out=words[s // PACK_FACTOR : e // PACK_FACTOR, :, j])
    return words.view(torch.int32).view(out_features // PACK_FACTOR, in_features).t().contiguous()


def dequantize(q: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Reference dequantize: [out_features, in_features] in `dtype`; (q - zero) * scale, exact in fp32, cast."""
    g = q.group_size
    codes = unpack(q.qweight).float()
    zeros = unpack(q.qzeros).float().repeat_interleave(g, dim=0)
    scales = q.scales.float().repeat_interleave(g, dim=0)
    return ((codes - zeros) * scales).to(dtype).t().contiguous()


def to_state_dict(q: Int4Weight, prefix: str) -> dict[str, torch.Tensor]:
    """{prefix}.qweight, {prefix}.qzeros, {prefix}.scales, as AutoAWQ saves them (the bias is not ours)."""
    return {f"{prefix}.qweight": q.qweight, f"{prefix}.qzeros": q.qzeros, f"{prefix}.scales": q.scales}


def from_state_dict(tensors: Mapping[str, torch.Tensor], prefix: str) -> Int4Weight:
    """Read the tensors of `to_state_dict` back; ValueError when their dtypes or shapes do not fit together."""
    q = Int4Weight(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"])
    found = {name: (t.dtype, list(t.shape)) for name, t in vars(q).items()}
    in_features, packed_out = q.qweight.shape if q.qweight.dim() == 2 else (0, 0)
    num_groups = q.scales.shape[0] if q.scales.dim() == 2 and q.scales.shape[0] else 1
    wanted = {
        "qweight": (torch.int32, [in_features, packed_out]),
        "qzeros": (torch.int32, [num_groups, packed_out]),
        "scales": (torch.float16, [num_groups, packed_out * PACK_FACTOR]),
    }
    if found != wanted or in_features % num_groups:
        raise ValueError(f"{prefix}: AWQ tensors do not fit together: got {found}")
    check_shape(in_features, packed_out * PACK_FACTOR, in_features // num_groups)
    return q


def fake_quantize(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize weight [out_features, in_features], in fp32.

    Equal to dequantize(quantize(weight, *compute_scales_zeros(weight, group_size)), torch.float32)
    (scales rounded to fp16 first, as stored), without packing: what calibration searches score.
    """
    out_features, in_features = weight.shape
    check_shape(in_features, out_features, group_size)
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scales, zeros = grid(groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True))
    return snap(groups, scales, zeros).reshape(out_features, in_features)


class AsymmetricGrid(Grid):
    """Each row's grid over a group of `group_size` columns: (scale fp16 [N], zero fp32 [N], 0..15), the
    round-to-nearest grid of the group's [min, max] (times `shrink`)."""

    def __init__(self, group_size: int):
        self.group_size = group_size

    def fit(self, block, shrink=1.0):
        scale, zero = grid(block.amin(dim=1) * shrink, block.amax(dim=1) * shrink)
        if not torch.isfinite(scale).all():
            raise ValueError("weight range exceeds what float16 scales can hold")
        return scale, zero

    def snap(self, values, grid_):
        scale, zero = grid_
        if values.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return snap(values, scale, zero)

    def encode(self, dequantized, grids):
        scales = torch.stack([s for s, _ in grids])  # [K / G, N]
        zeros = torch.stack([z for _, z in grids]).to(torch.uint8)
        return quantize(dequantized, scales, zeros)


class AwqGemm(LayoutFormat):
    """AutoAWQ's GEMM layout (`WQLinear_GEMM`): asymmetric uint4 in groups of `group_size` input channels,
    bias stored fp16.  Round-to-nearest and calibrated AWQ both write it."""

    layout = sys.modules[__name__]
    name, module_name, kernel = "awq-gemm", "Int4Linear", "int4_linear"
    loaded_by = "qwen2q, transformers (with AWQ support), AutoAWQ and vLLM"
    bias_dtype = torch.float16  # WQLinear_GEMM keeps its bias in fp16
    defaults = {"group_size": 128}

    def check_params(self, params):
        if params["group_size"] not in GROUP_SIZES:
            raise ValueError(f"group size {params['group_size']} is not supported; use one of {GROUP_SIZES}")

    def check_shape(self, out_features, in_features, params):
        check_shape(in_features, out_features, params["group_size"])

    def stored_tensors(self, name, out_features, in_features, params):
        g = params["group_size"]
        self.check_shape(out_features, in_features, params)
        return {f"{name}.qweight": TensorSpec((torch.int32,), ((in_features, out_features // PACK_FACTOR),)),
                f"{name}.qzeros": TensorSpec((torch.int32,), ((in_features // g, out_features // PACK_FACTOR),)),
                f"{name}.scales": TensorSpec((torch.float16,), ((in_features // g, out_features),))}

    def quantize(self, weight, params):
        with serial():
            return quantize(weight, *compute_scales_zeros(weight, params["group_size"]))

    def shape(self, q):
        return (q.out_features, q.in_features)

    def scale_group(self, params, in_features):
        return params["group_size"]

    def fake_quantize(self, weight, params):
        return fake_quantize(weight, params["group_size"])

    def grid(self, params, in_features):
        return AsymmetricGrid(params["group_size"])

    def to_config(self, params, skip, compute_dtype):
        return {"quant_method": "awq", "bits": 4, "group_size": params["group_size"], "zero_point": True,
                "version": "gemm", "modules_to_not_convert": [s for s in skip if s != "lm_head"] or None}

    def reads_config(self, config):
        return config.get("quant_method") == "awq"

    def from_config(self, config):
        if config.get("bits", 4) != 4 or not config.get("zero_point", True):
            raise ValueError(f"AWQ with bits={config.get('bits')} zero_point={config.get('zero_point')} is not supported")
        version = str(config.get("version") or config.get("format") or "gemm").lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; qwen2q reads the 'gemm' layout")
        skip = tuple(config.get("modules_to_not_convert") or ()) + ("lm_head",)
        return {"group_size": int(config.get("group_size", 128))}, skip, "bfloat16"


FORMAT = AwqGemm()

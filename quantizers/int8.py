"""Per-row symmetric int8: the storage of bitsandbytes `Linear8bitLt` checkpoints, byte for byte.

For a weight W [out_features, in_features]:

    absmax[r]  = max_k |W[r, k]|                             fp32 [out_features] (bitsandbytes: "SCB")
    qweight    = round(W * (127 / absmax[r]))                int8 [out_features, in_features], row-major
    W         ~= qweight * (absmax[r] / 127)

round() is half-to-even, computed in fp32 exactly as `bitsandbytes.functional.int8_vectorwise_quant`. An
all-zero row stores absmax 0 and zero codes.
"""
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .bnb_config import bnb_config, is_bnb, skipped
from .checks import NON_FINITE_WEIGHT, all_finite, check_weight, round_small_, serial
from .format import Grid, LayoutFormat, TensorSpec

_ROW_MAJOR = 0  # bitsandbytes' `weight_format` code for row-major; the only layout it still writes

# Values per block of rows on CPU (a 2 MiB fp32 scratch buffer).  The loop runs under serial(), so no op forks
# onto other threads whatever its size; what the size trades is torch's fixed cost per call (a few
# microseconds, ~10 calls a block) against cache.  Quantizing the real 0.5B's 168 linears (358M values,
# output allocation included, best of 3) took 0.74 s in blocks of 32000 values, 0.28 s in blocks of 2**18,
# 0.22 s in blocks of 2**19 and 0.20 s in blocks of 2**20.
_BLOCK_VALUES = 2**19


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """One int8 weight. qweight: int8 [out_features, in_features]; absmax: fp32 [out_features]."""

    qweight: torch.Tensor
    absmax: torch.Tensor


def quantize(weight: torch.Tensor) -> Int8Weight:
    """Quantize weight [out_features, in_features] (fp32, fp16 or bf16) per output row.

    Returns qweight int8 [out_features, in_features] and absmax fp32 [out_features].  Raises ValueError
    for a non-2-D or non-float weight, or one containing NaN/Inf.
    """
    weight = weight.detach()
    if weight.device.type != "cpu":
        check_weight(weight)
        absmax = weight.abs().amax(dim=1).float()
        factor = torch.where(absmax > 0, 127.0 / absmax, 0.0)
        return Int8Weight(torch.round(weight.float() * factor[:, None]).to(torch.int8), absmax)
    # The same arithmetic a block of rows at a time in one fp32 buffer: convert, row max |x| as
    # max(max x, -min x), scale, round, narrow.  A NaN or Inf makes its row's max NaN or Inf, so the finite
    # row maxima prove the weight finite and the check needs no pass of its own over the weight.
    check_weight(weight, values=False)
    out_features, in_features = weight.shape
    qweight = torch.empty(out_features, in_features, dtype=torch.int8)
    absmax = torch.empty(out_features, dtype=torch.float32)
    rows = min(out_features, max(1, _BLOCK_VALUES // in_features))
    x = torch.empty(rows, in_features)
    with serial():
        for s in range(0, out_features, rows):
            e = min(s + rows, out_features)
            xs = x[: e - s]
            xs.copy_(weight[s:e])
            # abs_: an all-zero row's max is +0.0 whichever zeros it holds, as |x|'s max is
            rowmax = torch.maximum(xs.amax(dim=1), xs.amin(dim=1).neg_(), out=absmax[s:e]).abs_()
            factor = torch.where(rowmax > 0, 127.0 / rowmax, 0.0)
            qweight[s:e].copy_(round_small_(xs.mul_(factor[:, None])))  # |x| <= 127 or inf: exact
    if not all_finite(absmax):
        raise ValueError(NON_FINITE_WEIGHT)
    return Int8Weight(qweight, absmax)


def dequantize(q: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """Reference dequantize: [out_features, in_features] in `dtype`; qweight * (absmax / 127) in fp32, cast."""
    return (q.qweight.float() * (q.absmax / 127.0)[:, None]).to(dtype)


def to_state_dict(q: Int8Weight, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes saves for an int8 linear `prefix` (e.g. "model.layers.0.mlp.up_proj").

    {prefix}.weight         int8 [out_features, in_features]
    {prefix}.SCB            fp32 [out_features]   (note: not "weight.SCB")
    {prefix}.weight_format  uint8 [] = 0 (row-major)
    """
    return {
        f"{prefix}.weight": q.qweight,
        f"{prefix}.SCB": q.absmax,
        f"{prefix}.weight_format": torch.tensor(_ROW_MAJOR, dtype=torch.uint8),
    }


def from_state_dict(tensors: Mapping[str, torch.Tensor], prefix: str) -> Int8Weight:
    """Read the tensors of `to_state_dict` back (weight_format may be absent); ValueError when invalid."""
    qweight, absmax = tensors[f"{prefix}.weight"], tensors[f"{prefix}.SCB"]
    weight_format = tensors.get(f"{prefix}.weight_format")
    if weight_format is not None and int(weight_format) != _ROW_MAJOR:
        raise ValueError(
            f"{prefix}.weight_format={int(weight_format)} is a GPU tile layout; only 0 (row-major) is read"
        )
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"{prefix}.weight must be int8 [out, in], got {qweight.dtype} {list(qweight.shape)}")
    if absmax.dtype != torch.float32 or tuple(absmax.shape) != (qweight.shape[0],):
        raise ValueError(f"{prefix}.SCB must be float32 [{len(qweight)}]; got {absmax.dtype} {list(absmax.shape)}")
    return Int8Weight(qweight, absmax)


class RowGrid(Grid):
    """One grid per row over all its columns: (absmax fp32 [N],), codes -127..127 of absmax / 127."""

    def __init__(self, in_features: int):
        self.group_size = in_features

    def fit(self, block, shrink=1.0):
        return (block.abs().amax(dim=1).float() * shrink,)

    def snap(self, values, grid):
        absmax = grid[0][:, None] if values.dim() == 2 else grid[0]
        factor = torch.where(absmax > 0, 127.0 / absmax, 0.0)
        return torch.round(values.float() * factor).clamp(-127, 127) * (absmax / 127.0)

    def encode(self, dequantized, grids):
        (absmax,) = grids[0]
        factor = torch.where(absmax > 0, 127.0 / absmax, 0.0)
        codes = torch.round(dequantized.float() * factor[:, None]).clamp(-127, 127)
        return Int8Weight(codes.to(torch.int8), absmax.float().contiguous())


class BnbInt8(LayoutFormat):
    """bitsandbytes `Linear8bitLt` storage (row-major int8 + per-row absmax), run weight-only."""

    layout = sys.modules[__name__]
    name, module_name, kernel = "bnb-int8", "Int8Linear", "int8_linear"
    loaded_by = "qwen2q and transformers with bitsandbytes"
    rounds_source_dtype = True  # bitsandbytes quantizes the weights the model holds

    def stored_tensors(self, name, out_features, in_features, params):
        return {f"{name}.weight": TensorSpec((torch.int8,), ((out_features, in_features),)),
                f"{name}.SCB": TensorSpec((torch.float32,), ((out_features,),)),
                f"{name}.weight_format": TensorSpec((torch.uint8,), ((), (1,)))}

    def quantize(self, weight, params):
        with serial():
            return quantize(weight)

    def shape(self, q):
        return tuple(q.qweight.shape)

    def grid(self, params, in_features):
        return RowGrid(in_features)

    def to_config(self, params, skip, compute_dtype):
        return bnb_config(False, skip, compute_dtype)

    def reads_config(self, config):
        return is_bnb(config, four_bit=False)

    def from_config(self, config):
        return {}, skipped(config), "bfloat16"


FORMAT = BnbInt8()

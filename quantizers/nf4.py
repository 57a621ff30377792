"""NF4 with double quantization: the bit layout of bitsandbytes `Linear4bit` checkpoints, byte for byte.

A weight W [out_features, in_features] of n elements is flattened row-major and cut into blocks of
BLOCK_SIZE = 64 consecutive elements (the last block may be partial):

    absmax[b]  = max |W| over block b                                   fp32, one per block
    code[k]    = index of the NF4 level nearest to W[k] / absmax[b]     4 bits, 0..15
    packed[j]  = code[2j] << 4 | code[2j + 1]                           uint8 [(n + 1) // 2, 1]

(an odd n pads one code for 0.0, i.e. 7). The absmax values are quantized once more ("double
quantization"): offset = mean(absmax), and absmax - offset is coded blockwise, NESTED_BLOCK_SIZE = 256
values per block, with the signed 8-bit dynamic map:

    nested_absmax[c] = max |absmax - offset| over nested block c       fp32
    absmax_code[b]   = index into dynamic_map() for (absmax[b] - offset) / nested_absmax[b // 256]
    absmax[b]       ~= dynamic_map()[absmax_code[b]] * nested_absmax[b // 256] + offset

Rounding follows bitsandbytes on CPU exactly, including two quirks kept for byte identity: a partial
last block divides by its absmax instead of multiplying by the reciprocal (and stores the absmax clamped
to 1e-38), and absmax codes come from bitsandbytes' 65536-entry lookup table (see _absmax_codes).
"""
import functools
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .bnb_config import bnb_config, is_bnb, skipped
from .checks import FLOAT_DTYPES, check_weight, serial
from .format import LayoutFormat, TensorSpec

BLOCK_SIZE = 64
NESTED_BLOCK_SIZE = 256

# The 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1]); index = 4-bit code. fp32 [16].
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

_TINY = 1e-38  # bitsandbytes' guard against dividing by a zero absmax
_LUT_SIZE = 65536  # bins of bitsandbytes' CPU lookup table over [-1, 1]


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """One NF4-quantized weight with double-quantized absmax (n = out_features * in_features).

    packed: uint8 [(n + 1) // 2, 1], two NF4 codes per byte, element 2k in the high nibble.
    absmax: uint8 [ceil(n / 64)], dynamic-map codes of (block absmax - offset).
    nested_absmax: fp32 [ceil(len(absmax) / 256)], one scale per 256 absmax codes.
    offset: the fp32 mean of the block absmax values, held as a Python float (exact).
    shape: (out_features, in_features).
    dtype: dtype of the original weight (recorded in the checkpoint; the default dequantize dtype).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor
    offset: float
    shape: tuple[int, int]
    dtype: torch.dtype


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit "dynamic" code (Dettmers, arXiv:1511.04561), fp32 [256], sorted ascending.

    For each decimal exponent e = 0..6, [0.1, 1] is cut into 2**e equal pieces and the piece midpoints,
    scaled by 10**(e - 6), are taken with both signs (2 * 127 values); 0 and 1 complete the 256.
    """
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        magnitudes = 10.0 ** (e - 6) * ((edges[:-1] + edges[1:]) / 2)
        values += [magnitudes, -magnitudes]
    return torch.sort(torch.cat(values)).values




def _nf4_codes(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [n] -> (codes uint8 [n + n % 2], absmax fp32 [ceil(n / 64)]).  The reference; `_pack_blocks`
    computes the same codes for whole blocks without a sort."""
    n = flat.numel()
    num_blocks = -(-n // BLOCK_SIZE)
    blocks = torch.nn.functional.pad(flat, (0, num_blocks * BLOCK_SIZE - n)).view(num_blocks, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    safe_absmax = absmax.clamp(min=_TINY)
    scaled = blocks * (1.0 / safe_absmax)[:, None]
    if n % BLOCK_SIZE:
        absmax[-1] = safe_absmax[-1]
        scaled[-1] = blocks[-1] / safe_absmax[-1]
    # Padding after element n is 0.0, so an odd n gets the code for 0.0 in its last low nibble.
    scaled = scaled.clamp(-1, 1).reshape(-1)[: n + n % 2]
    levels = NF4_LEVELS.to(flat.device)
    midpoints = (levels[:-1] + levels[1:]) / 2
    codes = torch.searchsorted(midpoints, scaled)  # a value exactly on a midpoint takes the lower level
    return codes.to(torch.uint8), absmax


@functools.cache
def _code_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Tables over the high 16 bits h of an fp32 value v with |v| <= 2 that give its NF4 code exactly:

        code(v) = low[h] + (v > threshold[h])       (uint8 [65536], fp32 [65536])

    The 2**16 fp32 values sharing h form one interval, so all but the intervals that hold one of the 15
    midpoints have a single code (threshold +inf); a midpoint's interval takes the code below it and
    compares with the midpoint itself, as searchsorted does (a value on a midpoint takes the lower code).
    Two midpoints never share an interval (asserted).  |v| > 1 codes like +-1 (the reference clamps).
    """
    levels = NF4_LEVELS
    midpoints = (levels[:-1] + levels[1:]) / 2
    h = torch.arange(_LUT_SIZE, dtype=torch.int64)
    ends = [(h << 16 | low_bits).to(torch.int32).view(torch.float32) for low_bits in (0, 0xFFFF)]
    codes = [torch.searchsorted(midpoints, e.nan_to_num(0.0, 2.0, -2.0).clamp(-1, 1)) for e in ends]
    low, high = torch.minimum(*codes), torch.maximum(*codes)
    reachable = (ends[0].abs() <= 2) & (ends[1].abs() <= 2)  # exponent field below 0x80: no NaN/Inf
    assert bool(((high - low)[reachable] <= 1).all())
    split = reachable & (high > low)
    threshold = torch.full((_LUT_SIZE,), float("inf"))
    threshold[split] = midpoints[low[split]]
    return low.to(torch.uint8), threshold


_CHUNK_BLOCKS = 500  # blocks per pass of _pack_blocks: see checks.SERIAL_VALUES


def _pack_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole blocks of `weight` (any float dtype, numel % 64 == 0) -> (packed uint8 [n / 2], absmax fp32
    [n / 64]), equal to packing `_nf4_codes(weight.reshape(-1).float())`.

    A chunk of blocks at a time, in cache: convert to fp32, absmax per block, scale by its reciprocal,
    look each value's code up from its high 16 bits (`_code_tables`) and pack pairs of codes into bytes.
    About 8 passes over L1/L2-resident buffers instead of ~12 over whole-weight temporaries and a sort.
    """
    low, threshold = _code_tables()
    blocks = weight.reshape(-1, BLOCK_SIZE)
    num_blocks = blocks.shape[0]
    absmax = torch.empty(num_blocks, dtype=torch.float32)
    packed = torch.empty(num_blocks * BLOCK_SIZE // 2, dtype=torch.uint8)
    c = min(_CHUNK_BLOCKS, num_blocks)
    x, limit = torch.empty(c, BLOCK_SIZE), torch.empty(c, BLOCK_SIZE)  # limit also holds |x| first
    bits = torch.empty(c * BLOCK_SIZE, dtype=torch.int32)
    codes = torch.empty(c * BLOCK_SIZE, dtype=torch.uint8)
    above = torch.empty(c * BLOCK_SIZE, dtype=torch.bool)
    for s in range(0, num_blocks, c):
        e = min(s + c, num_blocks)
        k = e - s
        xs, xf, idx, cs, up = x[:k], x[:k].view(-1), bits[: k * BLOCK_SIZE], codes[: k * BLOCK_SIZE], above[: k * BLOCK_SIZE]
        xs.copy_(blocks[s:e])
        torch.amax(torch.abs(xs, out=limit[:k]), dim=1, out=absmax[s:e])
        xs.mul_((1.0 / absmax[s:e].clamp(min=_TINY))[:, None])
        torch.bitwise_right_shift(xf.view(torch.int32), 16, out=idx).bitwise_and_(0xFFFF)
        torch.index_select(low, 0, idx, out=cs)
        torch.gt(xf, torch.index_select(threshold, 0, idx, out=limit[:k].view(-1)), out=up)
        cs.add_(up)
        pairs = cs.view(-1, 2)
        torch.add(pairs[:, 1], pairs[:, 0], alpha=16, out=packed[s * BLOCK_SIZE // 2 : e * BLOCK_SIZE // 2])
    return packed, absmax


@functools.cache
def _absmax_lut(device: torch.device) -> torch.Tensor:
    """uint8 [65536]: entry i is the dynamic-map code nearest to -1 + 2 i / 65535 (ties: the lower code)."""
    code = dynamic_map().to(device)
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32, device=device) * 2.0 / (_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def _absmax_codes(centered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [m] -> (codes uint8 [m], nested_absmax fp32 [ceil(m / 256)]).

    bitsandbytes' CPU kernel does not search for the nearest code: it rounds the normalised value to one
    of 65536 grid points and reads the code from a table. That differs from the nearest code in about
    0.2% of values, and always for a value of exactly 0 (CUDA picks the nearest code). Reproduced here,
    with the kernel's all-zero codes for an all-zero block.
    """
    m = centered.numel()
    num_blocks = -(-m // NESTED_BLOCK_SIZE)
    blocks = torch.nn.functional.pad(centered, (0, num_blocks * NESTED_BLOCK_SIZE - m))
    blocks = blocks.view(num_blocks, NESTED_BLOCK_SIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(nested_absmax > 0, 1.0 / nested_absmax, 0.0)
    t = ((blocks * inverse[:, None]).clamp(-1, 1) + 1.0) * 0.5
    grid_index = (t * (_LUT_SIZE - 1) + 0.5).long()
    codes = _absmax_lut(centered.device)[grid_index]
    codes[nested_absmax == 0] = 0
    return codes.reshape(-1)[:m], nested_absmax


def quantize(weight: torch.Tensor) -> NF4Weight:
    """Quantize weight [out_features, in_features] (fp32, fp16 or bf16) to NF4 with double quantization.

    Raises ValueError for a non-2-D or non-float weight, or one containing NaN/Inf.
    """
    flat = weight.detach().reshape(-1)
    whole = flat.numel() - flat.numel() % BLOCK_SIZE
    with serial():
        check_weight(weight)
        if flat.device.type == "cpu" and whole:
            packed, absmax = _pack_blocks(flat[:whole])
            if whole < flat.numel():  # a partial last block: the reference path, on that block alone
                codes, tail_absmax = _nf4_codes(flat[whole:].float())
                packed = torch.cat([packed, codes[0::2] << 4 | codes[1::2]])
                absmax = torch.cat([absmax, tail_absmax])
            packed = packed.unsqueeze(1)
        else:
            codes, absmax = _nf4_codes(flat.float())
            packed = (codes[0::2] << 4 | codes[1::2]).unsqueeze(1)
    # outside serial(): a sum's rounding depends on how many threads split it, and the offset is stored
    offset = absmax.mean()
    with serial():
        absmax_codes, nested_absmax = _absmax_codes(absmax - offset)
    return NF4Weight(packed, absmax_codes, nested_absmax, offset.item(), tuple(weight.shape), weight.dtype)


def decode_absmax(q: NF4Weight) -> torch.Tensor:
    """Per-block absmax, fp32 [ceil(n / 64)]: dynamic_map()[absmax[b]] * nested_absmax[b // 256] + offset."""
    nested = q.nested_absmax.repeat_interleave(NESTED_BLOCK_SIZE)[: q.absmax.numel()]
    code = dynamic_map().to(q.absmax.device)
    return code[q.absmax.long()] * nested + torch.tensor(q.offset, dtype=torch.float32)


def dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference dequantize: [out_features, in_features] in `dtype` (default q.dtype).

    Each element is NF4_LEVELS[code] * absmax computed in fp32, then rounded once to `dtype`.
    """
    n = q.shape[0] * q.shape[1]
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=-1).reshape(-1)[:n]
    absmax = decode_absmax(q).repeat_interleave(BLOCK_SIZE)[:n]
    values = NF4_LEVELS.to(q.packed.device)[codes.long()] * absmax
    return values.view(q.shape).to(dtype or q.dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_state_dict(q: NF4Weight, prefix: str) -> dict[str, torch.Tensor]:
    """The six tensors transformers saves for the NF4 linear `prefix` (e.g. "model.layers.0.mlp.up_proj").

    {prefix}.weight                                  uint8 [(n + 1) // 2, 1]
    {prefix}.weight.absmax                           uint8 [ceil(n / 64)]
    {prefix}.weight.quant_map                        fp32 [16]
    {prefix}.weight.nested_absmax                    fp32 [ceil(n / 64 / 256)]
    {prefix}.weight.nested_quant_map                 fp32 [256]
    {prefix}.weight.quant_state.bitsandbytes__nf4    uint8 [len]: UTF-8 JSON, keys in bitsandbytes' order
    """
    state = {
        "quant_type": "nf4",
        "blocksize": BLOCK_SIZE,
        "dtype": _dtype_name(q.dtype),
        "shape": list(q.shape),
        "nested_blocksize": NESTED_BLOCK_SIZE,
        "nested_dtype": "float32",
        "nested_offset": q.offset,
    }
    p = f"{prefix}.weight"
    return {
        p: q.packed,
        f"{p}.absmax": q.absmax,
        f"{p}.quant_map": NF4_LEVELS.clone(),
        f"{p}.nested_absmax": q.nested_absmax,
        f"{p}.nested_quant_map": dynamic_map().clone(),
        f"{p}.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8),
    }


def from_state_dict(tensors: Mapping[str, torch.Tensor], prefix: str) -> NF4Weight:
    """Read the six tensors of `to_state_dict` back; ValueError for anything this module would not write."""
    p = f"{prefix}.weight"
    try:
        state = json.loads(bytes(tensors[f"{p}.quant_state.bitsandbytes__nf4"].tolist()).decode())
    except ValueError:  # bad UTF-8 or JSON
        state = None
    if not isinstance(state, dict):
        raise ValueError(f"{p}.quant_state.bitsandbytes__nf4 is not a UTF-8 JSON object")
    supported = {
        "quant_type": "nf4",
        "blocksize": BLOCK_SIZE,
        "nested_blocksize": NESTED_BLOCK_SIZE,
        "nested_dtype": "float32",
    }
    for key, value in supported.items():
        if state.get(key) != value:
            raise ValueError(f"{p}: quant_state {key}={state.get(key)!r}, only {value!r} is supported")
    if not torch.equal(tensors[f"{p}.quant_map"].float().cpu(), NF4_LEVELS):
        raise ValueError(f"{p}.quant_map is not the standard NF4 table")
    if not torch.equal(tensors[f"{p}.nested_quant_map"].float().cpu(), dynamic_map()):
        raise ValueError(f"{p}.nested_quant_map is not the standard signed dynamic map")
    dtype = getattr(torch, state.get("dtype"), None) if isinstance(state.get("dtype"), str) else None
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{p}: quant_state dtype {state.get('dtype')!r} is not float32, float16 or bfloat16")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
        raise ValueError(f"{p}: quant_state shape {shape!r} is not [out_features, in_features]")
    shape = tuple(shape)
    offset = state.get("nested_offset")
    if type(offset) not in (int, float) or not math.isfinite(offset):
        raise ValueError(f"{p}: quant_state nested_offset {offset!r} is not a finite number")
    q = NF4Weight(
        packed=tensors[p],
        absmax=tensors[f"{p}.absmax"],
        nested_absmax=tensors[f"{p}.nested_absmax"],
        offset=float(state["nested_offset"]),
        shape=shape,
        dtype=dtype,
    )
    n = shape[0] * shape[1]
    n_blocks = -(-n // BLOCK_SIZE)
    expected_tensors = {
        p: (q.packed, torch.uint8, (n + 1) // 2),
        f"{p}.absmax": (q.absmax, torch.uint8, n_blocks),
        f"{p}.nested_absmax": (q.nested_absmax, torch.float32, -(-n_blocks // NESTED_BLOCK_SIZE)),
    }
    for key, (tensor, wanted_dtype, numel) in expected_tensors.items():
        if tensor.dtype != wanted_dtype or tensor.numel() != numel:
            raise ValueError(
                f"{key}: got {tensor.dtype} with {tensor.numel()} elements,"
                f" shape {list(shape)} needs {wanted_dtype} with {numel}"
            )
    return q


class BnbNF4(LayoutFormat):
    """bitsandbytes NF4 with double quantization (`Linear4bit`), as transformers saves it."""

    layout = sys.modules[__name__]
    name, module_name, kernel = "bnb-nf4", "NF4Linear", "nf4_linear"
    loaded_by = "qwen2q and transformers with bitsandbytes"
    rounds_source_dtype = True  # bitsandbytes quantizes the weights the model holds

    def stored_tensors(self, name, out_features, in_features, params):
        n = out_features * in_features
        blocks = -(-n // BLOCK_SIZE)
        w, floats = f"{name}.weight", FLOAT_DTYPES
        return {w: TensorSpec((torch.uint8,), (((n + 1) // 2, 1),)),
                f"{w}.absmax": TensorSpec((torch.uint8,), ((blocks,),)),
                f"{w}.quant_map": TensorSpec(floats, ((16,),)),
                f"{w}.nested_absmax": TensorSpec((torch.float32,), ((-(-blocks // NESTED_BLOCK_SIZE),),)),
                f"{w}.nested_quant_map": TensorSpec(floats, ((256,),)),
                f"{w}.quant_state.bitsandbytes__nf4": TensorSpec((torch.uint8,), None)}

    def quantize(self, weight, params):
        return quantize(weight)

    def shape(self, q):
        return tuple(q.shape)

    def scale_group(self, params, in_features):
        return BLOCK_SIZE  # blocks of 64 run along the rows when in_features is a multiple of 64

    def to_config(self, params, skip, compute_dtype):
        return bnb_config(True, skip, compute_dtype)

    def reads_config(self, config):
        return is_bnb(config, four_bit=True)

    def from_config(self, config):
        if config.get("bnb_4bit_quant_type", "fp4") != "nf4":
            raise ValueError(f"bitsandbytes 4-bit type {config.get('bnb_4bit_quant_type')!r} is not supported; only nf4")
        if not config.get("bnb_4bit_use_double_quant", False):
            raise ValueError("bitsandbytes NF4 without double quantization is not supported yet")
        return {}, skipped(config), str(config.get("bnb_4bit_compute_dtype") or "bfloat16")


FORMAT = BnbNF4()

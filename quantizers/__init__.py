"""Pure format layer: quantize, pack, unpack and reference-dequantize weights; no modules, no kernels.

One module per bit layout: `nf4` (bitsandbytes NF4 with double quantization), `int8` (bitsandbytes
per-row int8), `int4` (AutoAWQ GEMM group-wise uint4). Each raises ValueError for inputs it cannot hold.
"""
from . import int4, int8, nf4
from .int4 import Int4Weight
from .int8 import Int8Weight
from .nf4 import NF4Weight

__all__ = ["int4", "int8", "nf4", "Int4Weight", "Int8Weight", "NF4Weight"]

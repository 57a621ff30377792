"""Quantized linear modules, and the quantize-time conversion of one linear into checkpoint tensors.

A module holds the stored tensors of one format (as buffers, so `.to(device)` moves them) plus an
unquantized bias, and its forward calls `qwen2q.kernels`.  Modules are filled from checkpoints through
`load_checkpoint_tensor(suffix, tensor)` with the checkpoint's own key suffixes (`weight.absmax`,
`SCB`, `qzeros`, ...), and `finish_loading()` checks that every tensor came.  The Qwen2 model itself is
never edited: `swap_linears` replaces its nn.Linear children from outside.
"""
from __future__ import annotations

import torch
from torch import nn

from qwen2q import kernels
from qwen2q.errors import Qwen2qError
from qwen2q.qconfig import QuantConfig
from qwen2q.quantizers import int4, int8, nf4


class QuantLinear(nn.Module):
    """Base: collects checkpoint tensors by suffix, then builds the format's weight object."""

    SUFFIXES: tuple[str, ...] = ()

    def __init__(self, name: str, in_features: int, out_features: int, has_bias: bool, dtype: torch.dtype):
        super().__init__()
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.has_bias, self.dtype = has_bias, dtype
        self.bias = None
        self._incoming: dict[str, torch.Tensor] = {}

    def load_checkpoint_tensor(self, suffix: str, tensor: torch.Tensor) -> None:
        if suffix == "bias":
            self.bias = nn.Parameter(tensor.to(self.dtype), requires_grad=False)
        elif suffix in self.SUFFIXES:
            self._incoming[f"{self.name}.{suffix}"] = tensor
        else:
            raise Qwen2qError(f"{self.name}: unexpected checkpoint tensor {self.name}.{suffix} for {type(self).__name__}")

    def finish_loading(self) -> None:
        missing = [s for s in self.SUFFIXES if f"{self.name}.{s}" not in self._incoming]
        if missing or (self.has_bias and self.bias is None):
            missing += ["bias"] if self.has_bias and self.bias is None else []
            raise Qwen2qError(f"checkpoint lacks {', '.join(f'{self.name}.{s}' for s in missing)}")
        try:
            self._set_weight(self._incoming)
        except ValueError as e:
            raise Qwen2qError(f"{self.name}: {e}") from None
        self._incoming = {}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


class NF4Linear(QuantLinear):
    """bitsandbytes NF4 + double quant.  Buffers: packed uint8 [(N*K+1)//2, 1], absmax uint8 [ceil(N*K/64)],
    nested_absmax fp32 [ceil(N*K/64/256)]; offset (float) and shape kept as attributes."""

    SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                "weight.quant_state.bitsandbytes__nf4")

    def _set_weight(self, tensors):
        q = nf4.from_state_dict(tensors, self.name)
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("nested_absmax", q.nested_absmax)
        self.offset, self.shape = q.offset, q.shape

    def weight_q(self) -> nf4.NF4Weight:
        return nf4.NF4Weight(self.packed, self.absmax, self.nested_absmax, self.offset, self.shape, self.dtype)

    def forward(self, x):
        return kernels.nf4_linear(x, self.weight_q(), self.bias)


class Int8Linear(QuantLinear):
    """bitsandbytes int8 storage, run weight-only.  Buffers: qweight int8 [N, K], absmax (SCB) fp32 [N]."""

    SUFFIXES = ("weight", "SCB", "weight_format")

    def _set_weight(self, tensors):
        q = int8.from_state_dict(tensors, self.name)
        self.register_buffer("qweight", q.qweight)
        self.register_buffer("absmax", q.absmax)

    def weight_q(self) -> int8.Int8Weight:
        return int8.Int8Weight(self.qweight, self.absmax)

    def forward(self, x):
        return kernels.int8_linear(x, self.weight_q(), self.bias)


class Int4Linear(QuantLinear):
    """AWQ GEMM layout.  Buffers: qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N]."""

    SUFFIXES = ("qweight", "qzeros", "scales")

    def _set_weight(self, tensors):
        q = int4.from_state_dict(tensors, self.name)
        self.register_buffer("qweight", q.qweight)
        self.register_buffer("qzeros", q.qzeros)
        self.register_buffer("scales", q.scales)

    def weight_q(self) -> int4.Int4Weight:
        return int4.Int4Weight(self.qweight, self.qzeros, self.scales)

    def forward(self, x):
        return kernels.int4_linear(x, self.weight_q(), self.bias)


MODULES = {"nf4": NF4Linear, "int8": Int8Linear, "int4": Int4Linear, "awq": Int4Linear}
QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def swap_linears(model: nn.Module, qcfg: QuantConfig, dtype: torch.dtype) -> list[QuantLinear]:
    """Replace the decoder layers' nn.Linear children (those `qcfg` does not skip) with empty quantized
    modules of `qcfg.method`; return them, ready for `load_checkpoint_tensor`."""
    cls = MODULES[qcfg.method]
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and child_name in QUANTIZABLE and not qcfg.skips(full):
                q = cls(full, child.in_features, child.out_features, child.bias is not None, dtype)
                setattr(module, child_name, q)
                swapped.append(q)
    return swapped


def quantize_linear(qcfg: QuantConfig, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantize linear `name`'s weight [out, in] into its checkpoint tensors."""
    try:
        if qcfg.method == "nf4":
            return nf4.to_state_dict(nf4.quantize(weight), name)
        if qcfg.method == "int8":
            return int8.to_state_dict(int8.quantize(weight), name)
        scales, zeros = int4.compute_scales_zeros(weight, qcfg.group_size)
        return int4.to_state_dict(int4.quantize(weight, scales, zeros), name)
    except ValueError as e:
        hint = f" (or keep it in full precision with --skip {name.rsplit('.', 1)[-1]})" if "multiple" in str(e) else ""
        raise Qwen2qError(f"{name}.weight: {e}{hint}") from None

"""What an on-disk quantization format is, as the rest of qwen2q sees it.

A `Format` is one checkpoint layout (bitsandbytes NF4, bitsandbytes int8, AutoAWQ GEMM int4, ...).  Each
lives in its own module of this package, next to the bit layout it owns, and sets `FORMAT = TheFormat()`
there; `qwen2q.quantizers.registry` finds it by that name, so adding a format touches only its module
(plus its kernel tile and tests).  A format owns:

- its weight object (a frozen dataclass of tensors and plain values) and the stored tensors' names,
  dtypes and shapes for a linear [out_features, in_features] (`stored_tensors`);
- round-to-nearest quantization, the state dict it writes and reads back, and the reference dequantize;
- the dtype its linears' biases are stored in (`bias_dtype`; None: the model's);
- the `quantization_config` it writes into config.json and reads back (`to_config` / `from_config`);
- the name of the `qwen2q.kernels` op that multiplies by its weights (`kernel`), and the name of the
  module class the loader builds (`module_name`);
- what the calibration algorithms (`qwen2q.calibrate`) need of its grid: `scale_group` (how many
  consecutive input channels share a scale), `fake_quantize` (what the scale and clip searches score),
  and, for GPTQ's error-compensating rounding, a `Grid` (`grid`; None where the format has none).

Parameters (e.g. the group size) travel as a plain dict, checked by `check_params`.
"""
from __future__ import annotations

import abc
import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A stored tensor's allowed dtypes and shapes (`shapes` None: any shape)."""

    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...] | None


class Grid(abc.ABC):
    """A format's quantization grid as GPTQ sweeps it: each output row n holds one grid per group of
    `group_size` consecutive input columns.  A grid is a tuple of tensors with one entry per row ([N]);
    GPTQ fits one per group as its sweep reaches the group (or all up front), snaps columns onto it and
    finally stores the swept weight on exactly those grids (`encode`)."""

    group_size: int

    @abc.abstractmethod
    def fit(self, block: torch.Tensor, shrink: float = 1.0) -> tuple[torch.Tensor, ...]:
        """The grid of each row of block fp32 [N, G] for its range shrunk by `shrink` (1.0: the full range);
        ValueError when the stored grid cannot hold it (e.g. a scale beyond float16).  A row's grid depends
        on its minimum and maximum alone, so fitting the rows' extremes [N, 2] gives the same grid (GPTQ's
        `mse_fit` relies on it)."""

    @abc.abstractmethod
    def snap(self, values: torch.Tensor, grid: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """values fp32 [N] or [N, j] rounded onto each row's grid point and dequantized, fp32, same shape."""

    @abc.abstractmethod
    def encode(self, dequantized: torch.Tensor, grids: list[tuple[torch.Tensor, ...]]):
        """The format's weight object storing dequantized [N, K] (every value a grid point of its group's
        grid in `grids`, one per group in column order) exactly."""


class Format(abc.ABC):
    """One on-disk layout for a quantized linear.  Subclasses set the attributes and implement every
    abstract method (a missing one fails at instantiation, not at first use)."""

    name: str = ""  # registry name, e.g. "bnb-nf4"
    module_name: str = ""  # class name of the loaded module, e.g. "NF4Linear"
    kernel: str = ""  # its qwen2q.kernels op, kernel(x, weight, bias) -> y, and CPU backend; "" or no op: the reference
    bias_dtype: torch.dtype | None = None  # how a quantized linear's bias is stored; None: as the model's
    rounds_source_dtype: bool = False  # calibrated weights are cast to the checkpoint's dtype before the final
    # quantize (as bitsandbytes quantizes the model it loaded); False: quantized from fp32
    defaults: Mapping[str, Any] = {}  # parameters and their defaults, e.g. {"group_size": 128}
    loaded_by: str = "qwen2q"  # what reads checkpoints in this format, for the model card

    def params(self, **given) -> dict[str, Any]:
        """This format's parameters: the defaults updated with `given` (unknown names refused), checked."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name} takes no parameter {unknown[0]!r}")
        p = {**self.defaults, **given}
        self.check_params(p)
        return p

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raise ValueError, naming the value and what is allowed, for parameters this format cannot use."""

    def check_shape(self, out_features: int, in_features: int, params: Mapping[str, Any]) -> None:
        """Raise ValueError, naming the sizes and what would work, unless the layout holds this linear."""

    @abc.abstractmethod
    def stored_tensors(self, name: str, out_features: int, in_features: int,
                       params: Mapping[str, Any]) -> dict[str, TensorSpec]:
        """{full tensor name: spec} of the tensors linear `name` [out, in] stores (its bias excluded)."""

    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor, params: Mapping[str, Any]):
        """Round-to-nearest: weight [out, in] (fp32/fp16/bf16) -> this format's weight object."""

    @abc.abstractmethod
    def to_state_dict(self, q, name: str) -> dict[str, torch.Tensor]:
        """{full tensor name: tensor} that linear `name` stores for weight object `q`, as the peers save it."""

    @abc.abstractmethod
    def from_state_dict(self, tensors: Mapping[str, torch.Tensor], name: str):
        """Read `to_state_dict`'s tensors back; ValueError for anything this format would not write."""

    @abc.abstractmethod
    def shape(self, q) -> tuple[int, int]:
        """(out_features, in_features) of the linear weight object `q` holds."""

    @abc.abstractmethod
    def dequantize(self, q, dtype: torch.dtype) -> torch.Tensor:
        """Reference dequantize: [out_features, in_features] in `dtype`."""

    @abc.abstractmethod
    def to_config(self, params: Mapping[str, Any], skip: list[str], compute_dtype: str) -> dict[str, Any]:
        """The config.json `quantization_config` of a checkpoint in this format (`skip`: modules kept float)."""

    @abc.abstractmethod
    def reads_config(self, config: Mapping[str, Any]) -> bool:
        """Whether `quantization_config` describes this format (possibly with unsupported settings)."""

    @abc.abstractmethod
    def from_config(self, config: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...], str]:
        """(params, skipped module names, compute dtype) from a `quantization_config` this format reads;
        ValueError for settings it does not support."""

    def scale_group(self, params: Mapping[str, Any], in_features: int) -> int:
        """How many consecutive input channels of a row share one scale (default: the whole row)."""
        return in_features

    def fake_quantize(self, weight: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """Quantize then dequantize weight [out, in], fp32: what calibration searches score."""
        return self.dequantize(self.quantize(weight, params), torch.float32)

    def grid(self, params: Mapping[str, Any], in_features: int) -> Grid | None:
        """The grid GPTQ rounds a linear with `in_features` inputs onto, or None when this format offers none."""
        return None

    def __repr__(self) -> str:
        return f"<format {self.name}>"


class LayoutFormat(Format):
    """A format whose bit-layout module (`layout`) provides `to_state_dict(q, name)`,
    `from_state_dict(tensors, name)` and `dequantize(q, dtype)` as functions: the format forwards to them."""

    layout: types.ModuleType

    def to_state_dict(self, q, name):
        return self.layout.to_state_dict(q, name)

    def from_state_dict(self, tensors, name):
        return self.layout.from_state_dict(tensors, name)

    def dequantize(self, q, dtype):
        return self.layout.dequantize(q, dtype)

"""`--method` as shorthand for a one-rule recipe (`qwen2q.recipe`): which format each decoder linear gets,
and the `quantization_config` that travels in config.json.

A method names one format of `qwen2q.quantizers.registry` (nf4 -> bnb-nf4, int8 -> bnb-int8, int4 and awq ->
awq-gemm) plus its parameters and the modules kept in full precision.  The format writes exactly the JSON
its ecosystem expects (transformers' BitsAndBytesConfig, AutoAWQ's config) and reads it back, so
checkpoints move between qwen2q, transformers, AutoAWQ and vLLM.  qwen2q adds only a `qwen2q` note (tool,
version, method), which the others ignore, at the top level of config.json.

Everything that builds or reads quantized linears asks the recipe (`Recipe.format_for(module_name)`),
never the method, so recipes that give different modules different formats fit the same interface.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from qwen2q.errors import Qwen2qError
from qwen2q.quantizers import registry
from qwen2q.quantizers.format import Format
from qwen2q.recipe import DEFAULT_SKIP, Recipe, Rule

METHOD_FORMATS = {"nf4": "bnb-nf4", "int8": "bnb-int8", "int4": "awq-gemm", "awq": "awq-gemm"}
METHODS = tuple(METHOD_FORMATS)
GROUP_SIZES = (32, 64, 128)
LAYOUTS = ("native", "compressed-tensors")
COMPRESSED_TENSORS = ("int4", "awq", "int8")  # the methods that may be written as compressed-tensors


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """method: nf4 | int8 | int4 | awq, or the name of any registered format (round-to-nearest).  group_size applies to the formats that take one (awq-gemm); skip
    lists module names (or name suffixes, or prefixes) kept in full precision; embeddings are never
    quantized."""

    method: str
    group_size: int = 128
    skip: tuple[str, ...] = DEFAULT_SKIP
    compute_dtype: str = "bfloat16"
    layout: str = "native"  # "compressed-tensors": int4/awq/int8 written as compressed-tensors pack-quantized

    def __post_init__(self):
        if self.method not in METHODS and self.method not in registry.names():
            raise Qwen2qError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)} "
                              f"or a format: {', '.join(registry.names())}")
        if self.layout not in LAYOUTS:
            raise Qwen2qError(f"unknown output format {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.layout == "compressed-tensors" and self.method not in COMPRESSED_TENSORS:
            raise Qwen2qError(f"--format compressed-tensors goes with --method {', '.join(COMPRESSED_TENSORS)}; "
                              f"{self.method} is written in its own layout")
        self.params  # checks them

    @property
    def format(self) -> Format:
        """The registered format: the method's (nf4 -> bnb-nf4, ...; with layout "compressed-tensors",
        ct-pack), or the one the method names directly."""
        if self.layout == "compressed-tensors":
            return registry.get("ct-pack")
        return registry.get(METHOD_FORMATS.get(self.method, self.method))

    @property
    def params(self) -> dict[str, Any]:
        """The format's parameters (only those it takes), checked."""
        fmt = self.format
        if self.layout == "compressed-tensors":  # int8: W8A16 per channel; int4/awq: asymmetric W4A16 (AWQ's grid)
            int8 = self.method == "int8"
            given = {"bits": 8 if int8 else 4, "group_size": 0 if int8 else self.group_size, "symmetric": int8}
        else:
            given = {"group_size": self.group_size} if "group_size" in fmt.defaults else {}
        try:
            return fmt.params(**given)
        except ValueError as e:
            raise Qwen2qError(str(e)) from None

    def recipe(self, rounding: str | None = None, act_order: bool = False, awq_scales: bool = False) -> Recipe:
        """The one-rule recipe this method stands for.  awq: AWQ's scale search, then GPTQ rounding
        (rounding None or "gptq", optionally in act order) or clip search and round to nearest
        ("nearest"); nf4 with `awq_scales`: the scale search, then NF4 as bitsandbytes rounds it."""
        algorithm = "rtn"
        if self.method == "awq":
            algorithm = "awq" if rounding == "nearest" else "awq-gptq-act-order" if act_order else "awq-gptq"
        elif self.method == "nf4" and awq_scales:
            algorithm = "awq-scales"
        return Recipe((Rule("*", self.format.name, self.params, algorithm),), skip=tuple(self.skip),
                      compute_dtype=self.compute_dtype)

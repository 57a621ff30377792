"""`--method` as a quantization scheme: which format each decoder linear gets, and the
`quantization_config` that travels in config.json.

A method names one format of `qwen2q.quantizers.registry` (nf4 -> bnb-nf4, int8 -> bnb-int8, int4 and awq ->
awq-gemm) plus its parameters and the modules kept in full precision.  The format writes exactly the JSON
its ecosystem expects (transformers' BitsAndBytesConfig, AutoAWQ's config) and reads it back, so
checkpoints move between qwen2q, transformers, AutoAWQ and vLLM.  qwen2q adds only a `qwen2q` note (tool,
version, method), which the others ignore, at the top level of config.json.

Everything that builds or reads quantized linears asks `format_for(module_name)`, never the method, so
a scheme that gives different modules different formats fits the same interface.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from qwen2q.errors import Qwen2qError
from qwen2q.quantizers import registry
from qwen2q.quantizers.format import Format

METHOD_FORMATS = {"nf4": "bnb-nf4", "int8": "bnb-int8", "int4": "awq-gemm", "awq": "awq-gemm"}
METHODS = tuple(METHOD_FORMATS)
GROUP_SIZES = (32, 64, 128)
DEFAULT_SKIP = ("lm_head",)


def _skip_matches(module_name: str, entry: str) -> bool:
    """A skip entry names a module, a dotted suffix of one ('mlp.down_proj', 'down_proj') or a prefix ('model.layers.3')."""
    return module_name == entry or module_name.endswith("." + entry) or module_name.startswith(entry + ".")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """method: nf4 | int8 | int4 | awq, or the name of any registered format (round-to-nearest).  group_size applies to the formats that take one (awq-gemm); skip
    lists module names (or name suffixes, or prefixes) kept in full precision; embeddings are never
    quantized."""

    method: str
    group_size: int = 128
    skip: tuple[str, ...] = DEFAULT_SKIP
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.method not in METHODS and self.method not in registry.names():
            raise Qwen2qError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)} "
                              f"or a format: {', '.join(registry.names())}")
        self.params  # checks them

    @property
    def format(self) -> Format:
        """The registered format: the method's (nf4 -> bnb-nf4, ...), or the one the method names directly."""
        return registry.get(METHOD_FORMATS.get(self.method, self.method))

    @property
    def params(self) -> dict[str, Any]:
        """The format's parameters (only those it takes), checked."""
        fmt = self.format
        given = {"group_size": self.group_size} if "group_size" in fmt.defaults else {}
        try:
            return fmt.params(**given)
        except ValueError as e:
            raise Qwen2qError(str(e)) from None

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def skips(self, module_name: str) -> bool:
        """Whether the linear `module_name` (e.g. 'model.layers.0.mlp.up_proj') stays unquantized."""
        return any(_skip_matches(module_name, s) for s in self.skip)

    def format_for(self, module_name: str) -> tuple[Format, dict[str, Any]] | None:
        """(format, parameters) of decoder linear `module_name`, or None when it stays in full precision."""
        return None if self.skips(module_name) else (self.format, self.params)

    def unused_skips(self, module_names) -> list[str]:
        """The skip entries (beyond the defaults) that match none of `module_names`: typos, most likely."""
        names = list(module_names)
        return [s for s in self.skip if s not in DEFAULT_SKIP and not any(_skip_matches(n, s) for n in names)]

    def to_hf(self) -> dict[str, Any]:
        """The config.json `quantization_config` dict."""
        return self.format.to_config(self.params, sorted(set(self.skip)), self.compute_dtype)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "QuantConfig":
        """Read a `quantization_config` written by qwen2q, transformers + bitsandbytes or AutoAWQ."""
        fmt = registry.for_config(d)
        if fmt is None:
            raise Qwen2qError(f"quantization method {d.get('quant_method')!r} is not supported; qwen2q reads "
                              f"{', '.join(registry.names())}")
        try:
            params, skip, compute_dtype = fmt.from_config(d)
        except ValueError as e:
            raise Qwen2qError(str(e)) from None
        # The first method that names the format: RTN int4 and calibrated AWQ share one layout; config.json's
        # "qwen2q" note says which made it.
        method = next((m for m, f in METHOD_FORMATS.items() if f == fmt.name), fmt.name)
        return cls(method, group_size=params.get("group_size", 128), skip=skip, compute_dtype=compute_dtype)

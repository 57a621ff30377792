"""The `quantization_config` that travels in config.json: one typed, validated object per method.

Each writes exactly the JSON its ecosystem expects (transformers' BitsAndBytesConfig for nf4 and int8,
AutoAWQ's config for int4/awq) and is read back from it, so checkpoints move between qwen2q,
transformers, AutoAWQ and vLLM.  qwen2q adds only a `qwen2q` note (tool, version, method), which the others ignore,
at the top level of config.json.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from qwen2q.errors import Qwen2qError

METHODS = ("nf4", "int8", "int4", "awq")
GROUP_SIZES = (32, 64, 128)
DEFAULT_SKIP = ("lm_head",)


def _skip_matches(module_name: str, entry: str) -> bool:
    """A skip entry names a module, a dotted suffix of one ('mlp.down_proj', 'down_proj') or a prefix ('model.layers.3')."""
    return module_name == entry or module_name.endswith("." + entry) or module_name.startswith(entry + ".")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """method: nf4 | int8 | int4 | awq.  group_size applies to int4/awq; skip lists module names
    (or name suffixes) kept in full precision; embeddings are never quantized."""

    method: str
    group_size: int = 128
    skip: tuple[str, ...] = DEFAULT_SKIP
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.method not in METHODS:
            raise Qwen2qError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in ("int4", "awq") and self.group_size not in GROUP_SIZES:
            raise Qwen2qError(f"group size {self.group_size} is not supported; use one of {GROUP_SIZES}")

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def skips(self, module_name: str) -> bool:
        """Whether the linear `module_name` (e.g. 'model.layers.0.mlp.up_proj') stays unquantized."""
        return any(_skip_matches(module_name, s) for s in self.skip)

    def unused_skips(self, module_names) -> list[str]:
        """The skip entries (beyond the defaults) that match none of `module_names`: typos, most likely."""
        names = list(module_names)
        return [s for s in self.skip if s not in DEFAULT_SKIP and not any(_skip_matches(n, s) for n in names)]

    def to_hf(self) -> dict[str, Any]:
        """The config.json `quantization_config` dict."""
        skip = sorted(set(self.skip))
        if self.method in ("nf4", "int8"):
            four = self.method == "nf4"
            return {
                "quant_method": "bitsandbytes",
                "_load_in_4bit": four,
                "_load_in_8bit": not four,
                "load_in_4bit": four,
                "load_in_8bit": not four,
                "llm_int8_threshold": 6.0,
                "llm_int8_skip_modules": skip or None,
                "llm_int8_enable_fp32_cpu_offload": False,
                "llm_int8_has_fp16_weight": False,
                "bnb_4bit_quant_type": "nf4" if four else "fp4",
                "bnb_4bit_use_double_quant": four,
                "bnb_4bit_compute_dtype": self.compute_dtype if four else "float32",
                "bnb_4bit_quant_storage": "uint8",
            }
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": self.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": [s for s in skip if s != "lm_head"] or None,
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "QuantConfig":
        """Read a `quantization_config` written by qwen2q, transformers + bitsandbytes or AutoAWQ."""
        method = d.get("quant_method")
        if method == "bitsandbytes":
            skip = tuple(d.get("llm_int8_skip_modules") or DEFAULT_SKIP)
            if d.get("load_in_4bit"):
                if d.get("bnb_4bit_quant_type", "fp4") != "nf4":
                    raise Qwen2qError(f"bitsandbytes 4-bit type {d.get('bnb_4bit_quant_type')!r} is not supported; only nf4")
                if not d.get("bnb_4bit_use_double_quant", False):
                    raise Qwen2qError("bitsandbytes NF4 without double quantization is not supported yet")
                return cls("nf4", skip=skip, compute_dtype=str(d.get("bnb_4bit_compute_dtype") or "bfloat16"))
            if d.get("load_in_8bit"):
                return cls("int8", skip=skip)
            raise Qwen2qError("bitsandbytes quantization_config has neither load_in_4bit nor load_in_8bit")
        if method == "awq":
            if d.get("bits", 4) != 4 or not d.get("zero_point", True):
                raise Qwen2qError(f"AWQ with bits={d.get('bits')} zero_point={d.get('zero_point')} is not supported")
            version = str(d.get("version") or d.get("format") or "gemm").lower()
            if version != "gemm":
                raise Qwen2qError(f"AWQ version {version!r} is not supported; qwen2q reads the 'gemm' layout")
            skip = tuple(d.get("modules_to_not_convert") or ()) + DEFAULT_SKIP
            # RTN int4 and calibrated AWQ share one layout; config.json's "qwen2q" note says which made it.
            return cls("int4", group_size=int(d.get("group_size", 128)), skip=skip)
        raise Qwen2qError(f"quantization method {method!r} is not supported; qwen2q reads bitsandbytes and awq")

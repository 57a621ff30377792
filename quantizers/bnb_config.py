"""The `quantization_config` transformers' BitsAndBytesConfig writes, shared by the bnb-nf4 and bnb-int8
formats: one dict with `load_in_4bit` or `load_in_8bit` set."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def bnb_config(four_bit: bool, skip: list[str], compute_dtype: str) -> dict[str, Any]:
    """The dict transformers + bitsandbytes write for NF4 + double quant (`four_bit`) or int8 storage."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": four_bit,
        "_load_in_8bit": not four_bit,
        "load_in_4bit": four_bit,
        "load_in_8bit": not four_bit,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip or None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4" if four_bit else "fp4",
        "bnb_4bit_use_double_quant": four_bit,
        "bnb_4bit_compute_dtype": compute_dtype if four_bit else "float32",
        "bnb_4bit_quant_storage": "uint8",
    }


def is_bnb(config: Mapping[str, Any], four_bit: bool) -> bool:
    return config.get("quant_method") == "bitsandbytes" and bool(config.get("load_in_4bit" if four_bit else "load_in_8bit"))


def skipped(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The modules a bitsandbytes checkpoint keeps in full precision (lm_head when it names none)."""
    return tuple(config.get("llm_int8_skip_modules") or ("lm_head",))

"""Qwen2 model configuration, read from a Hugging Face `config.json` in either dialect.

Older files carry `rope_theta`, `rope_scaling` and `torch_dtype`; transformers 5 writes
`rope_parameters` (holding `rope_theta`, `rope_type` and the scaling fields) and `dtype`.  Both are
normalised into one `Qwen2Config`; the raw dict is kept so that `quantization_config` and unknown
fields survive a round trip.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from qwen2q.errors import Qwen2qError

SUPPORTED_ROPE_TYPES = ("default", "yarn")


@dataclasses.dataclass
class RopeConfig:
    """Rotary embedding settings.

    `rope_type` is "default" or "yarn".  For YaRN, `factor` and `original_max_position_embeddings`
    follow the Qwen2 model cards; `dynamic=True` (a qwen2q opt-in) leaves sequences no longer than
    `original_max_position_embeddings` unscaled, while the default applies YaRN statically, as vLLM does.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    dynamic: bool = False


@dataclasses.dataclass
class Qwen2Config:
    """The architecture fields of a Qwen2ForCausalLM checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.raw.get("head_dim") or self.hidden_size // self.num_attention_heads

    @property
    def quantization_config(self) -> dict | None:
        return self.raw.get("quantization_config")

    def is_sliding_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` uses sliding-window attention (transformers' Qwen2 rule)."""
        return self.use_sliding_window and self.sliding_window is not None and layer_idx >= self.max_window_layers

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen2Config":
        model_type = d.get("model_type")
        if model_type != "qwen2":
            raise Qwen2qError(f"config.json has model_type={model_type!r}; qwen2q runs only 'qwen2' models")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise Qwen2qError(f"config.json lacks required field(s): {', '.join(missing)}")
        n_heads = int(d["num_attention_heads"])
        n_kv = int(d.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise Qwen2qError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        if "head_dim" not in d and d["hidden_size"] % n_heads:
            raise Qwen2qError(f"hidden_size={d['hidden_size']} is not divisible by num_attention_heads={n_heads}")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_read_rope(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            use_sliding_window=bool(d.get("use_sliding_window", False)),
            sliding_window=d.get("sliding_window"),
            max_window_layers=int(d.get("max_window_layers", 28)),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            raw=dict(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise Qwen2qError(f"{path} not found: a Hugging Face checkpoint directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise Qwen2qError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The raw config.json dict (unknown fields and quantization_config kept)."""
        return dict(self.raw)


def _read_rope(d: dict[str, Any]) -> RopeConfig:
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise Qwen2qError(f"rope type {rope_type!r} is not supported; qwen2q supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    rope = RopeConfig(theta=theta, rope_type=rope_type)
    if rope_type == "yarn":
        factor = params.get("factor")
        orig = params.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
        orig = int(orig or d.get("max_position_embeddings", 32768))
        if factor is None:
            factor = d.get("max_position_embeddings", orig) / orig
        rope.factor = float(factor)
        rope.original_max_position_embeddings = orig
        rope.beta_fast = float(params.get("beta_fast") or 32.0)
        rope.beta_slow = float(params.get("beta_slow") or 1.0)
        rope.attention_factor = params.get("attention_factor")
        rope.truncate = bool(params.get("truncate", True))
        rope.dynamic = bool(params.get("dynamic", False))
    return rope

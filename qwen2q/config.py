"""Qwen2 model configuration, read from a Hugging Face `config.json` in either dialect.

Older files carry `rope_theta`, `rope_scaling` and `torch_dtype`; transformers 5 writes
`rope_parameters` (holding `rope_theta`, `rope_type` and the scaling fields) and `dtype`.  Both are
normalised into one `Qwen2Config`; the raw dict is kept so that `quantization_config` and unknown
fields survive a round trip.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from qwen2q.errors import ConfigError

MIXED = "qwen2q-mixed"  # quant_method of a checkpoint whose linears use several formats (qwen2q.recipe)

SUPPORTED_ROPE_TYPES = ("default", "yarn")
_REQUIRED = object()


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
    def from_dict(cls, d: Any, source: str = "config.json") -> "Qwen2Config":
        """Read and check a config.json dict; a one-line ConfigError names the first bad field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} holds a JSON {type(d).__name__}, not an object of configuration fields")
        f = _Fields(d, source)
        model_type = d.get("model_type")
        if model_type != "qwen2":
            raise ConfigError(f"{source} has model_type={model_type!r}; qwen2q runs only 'qwen2' models")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source} lacks required field(s): {', '.join(missing)}")
        hidden = f.integer("hidden_size")
        n_heads = f.integer("num_attention_heads")
        n_kv = f.integer("num_key_value_heads", default=n_heads)
        if n_heads % n_kv:
            raise ConfigError(f"{source}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        head_dim = f.integer("head_dim", default=None)
        if head_dim is None:
            if hidden % n_heads:
                raise ConfigError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={n_heads}")
            head_dim = hidden // n_heads
        if head_dim % 2:
            raise ConfigError(f"{source}: head dimension {head_dim} is odd; rotary embeddings need an even head_dim")
        dtype = f.typed("dtype", str, None) or f.typed("torch_dtype", str, None) or "bfloat16"
        f.typed("quantization_config", dict, None)
        for key in ("bos_token_id", "eos_token_id"):
            ids = d.get(key)
            ids = ids if isinstance(ids, list) else [ids]
            if not all(i is None or (type(i) is int and i >= 0) for i in ids):
                raise ConfigError(f"{source}: {key}={d[key]!r} must be a token id, a list of them, or null")
        return cls(
            vocab_size=f.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size"),
            num_hidden_layers=f.integer("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            max_position_embeddings=f.integer("max_position_embeddings", default=32768),
            rms_norm_eps=f.positive_number(d, "rms_norm_eps", 1e-6),
            rope=_read_rope(d, f),
            tie_word_embeddings=f.typed("tie_word_embeddings", bool, False),
            use_sliding_window=f.typed("use_sliding_window", bool, False),
            sliding_window=f.integer("sliding_window", default=None),
            max_window_layers=f.integer("max_window_layers", default=28, minimum=0),
            dtype=dtype,
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
            raise ConfigError(f"{path} not found: a Hugging Face checkpoint directory needs a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The raw config.json dict (unknown fields and quantization_config kept)."""
        return dict(self.raw)


class _Fields:
    """Typed reads of config.json fields; each bad value is a ConfigError naming the field.  A field that is
    absent or null takes its default."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def _bad(self, key: str, value, wanted: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}={json.dumps(value)} must be {wanted}")

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1, within: dict | None = None) -> Any:
        d = self.d if within is None else within
        value = d.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self._bad(key, value, f"an integer >= {minimum}")
            return default
        if type(value) is not int or value < minimum:  # bool is an int subclass: excluded by `type(...) is`
            raise self._bad(key, value, f"an integer >= {minimum}")
        return value

    def positive_number(self, d: dict, key: str, default: float | None) -> float | None:
        value = d.get(key)
        if value is None:
            return default
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise self._bad(key, value, "a finite number > 0")
        return float(value)

    def typed(self, key: str, kind: type, default: Any, within: dict | None = None) -> Any:
        value = (self.d if within is None else within).get(key)
        if value is None:
            return default
        if type(value) is not kind:
            raise self._bad(key, value, {bool: "true or false", str: "a string", dict: "an object"}[kind])
        return value


def _read_rope(d: dict[str, Any], f: _Fields) -> RopeConfig:
    """The rotary settings from rope_parameters / rope_scaling (both optional objects) and rope_theta."""
    params = f.typed("rope_parameters", dict, {})
    scaling = f.typed("rope_scaling", dict, {})
    params = {**scaling, **params}
    theta = f.positive_number(params, "rope_theta", None) or f.positive_number(d, "rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{f.source}: rope type {rope_type!r} is not supported; qwen2q supports "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    rope = RopeConfig(theta=theta, rope_type=rope_type)
    if rope_type == "yarn":
        orig = (f.integer("original_max_position_embeddings", default=None, within=params)
                or f.integer("original_max_position_embeddings", default=None)
                or f.integer("max_position_embeddings", default=32768))
        rope.factor = f.positive_number(params, "factor", f.integer("max_position_embeddings", default=orig) / orig)
        rope.original_max_position_embeddings = orig
        rope.beta_fast = f.positive_number(params, "beta_fast", 32.0)
        rope.beta_slow = f.positive_number(params, "beta_slow", 1.0)
        rope.attention_factor = f.positive_number(params, "attention_factor", None)
        rope.truncate = f.typed("truncate", bool, True, within=params)
        rope.dynamic = f.typed("dynamic", bool, False, within=params)
    return rope

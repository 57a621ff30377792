"""Qwen2's architecture as data: the one place that names its decoder linears, their shapes, the
activation each one reads and the groups of linears that share an input (AWQ's scaling groups).

Loader, quantizers, calibration, validation, info and tools read these; the model (`qwen2q.model`)
builds exactly these modules.  For hidden size H, intermediate size I, n heads and m kv heads of
dimension D, the decoder linears of layer i (`model.layers.{i}.` + name) are:

    self_attn.q_proj  [n*D, H] + bias      self_attn.o_proj  [H, n*D]
    self_attn.k_proj  [m*D, H] + bias      mlp.gate_proj     [I, H]
    self_attn.v_proj  [m*D, H] + bias      mlp.up_proj       [I, H]
                                           mlp.down_proj     [H, I]

and, after the final norm, the output projection `lm_head` [V, H] (`HEAD`).  It is stored, and can be
quantized, only when it does not share the embedding table (`head_is_separate`): qwen2q's mixed precision
may give it a format like any decoder linear; every other recipe keeps it.
"""
from __future__ import annotations

import dataclasses
import re

from qwen2q.config import Qwen2Config

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LINEAR_NAMES = tuple(name.rpartition(".")[2] for name in LINEARS)  # q_proj, ..., down_proj
LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
NORMS = ("input_layernorm", "post_attention_layernorm")
HEAD = "lm_head"

# The activation each linear reads, by kind: the attention input (after input_layernorm), the attention
# output (o_proj's input), the MLP input (after post_attention_layernorm), and down_proj's input.
LINEAR_INPUT = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
                "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
                "mlp.down_proj": "down_in"}
# One linear per input kind, whose forward pre-hook sees that activation.
INPUT_READER = {kind: next(name for name, k in LINEAR_INPUT.items() if k == kind)
                for kind in dict.fromkeys(LINEAR_INPUT.values())}


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of one op.  prev: that op (a norm or a linear); inspect: the
    module whose output measures the group's error."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    needs_same_shape: bool = False  # v -> o folds only when v's output width equals o's input width

    @property
    def input_kind(self) -> str:
        return LINEAR_INPUT[self.linears[0]]


SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", needs_same_shape=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def head_is_separate(config: Qwen2Config) -> bool:
    """Whether lm_head is a tensor of its own (tie_word_embeddings false), and so may take a format."""
    return not config.tie_word_embeddings


def quantizable_linears(config: Qwen2Config) -> list[str]:
    """Every linear a recipe may give a format, by full name: the decoder linears layer by layer, then
    lm_head when it is separate."""
    return [layer_prefix(i) + name for i in range(config.num_hidden_layers) for name in LINEARS] + \
        ([HEAD] if head_is_separate(config) else [])


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def linear_shapes(config: Qwen2Config) -> dict[str, tuple[int, int, bool]]:
    """{name within a layer: (out_features, in_features, has_bias)} for the seven decoder linears."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"self_attn.q_proj": (q, h, True), "self_attn.k_proj": (kv, h, True), "self_attn.v_proj": (kv, h, True),
            "self_attn.o_proj": (h, q, False), "mlp.gate_proj": (i, h, False), "mlp.up_proj": (i, h, False),
            "mlp.down_proj": (h, i, False)}


def shape_of(config: Qwen2Config, name: str) -> tuple[int, int, bool]:
    """(out_features, in_features, has_bias) of quantizable linear `name` (a decoder linear's full name, or
    "lm_head")."""
    if name == HEAD:
        return config.vocab_size, config.hidden_size, False
    return linear_shapes(config)[name.split(".", 3)[3]]


def parameter_count(config: Qwen2Config) -> int:
    """Logical parameter count (what the bf16 model has), whatever format the checkpoint is stored in."""
    h = config.hidden_size
    per_layer = sum(o * i + (o if bias else 0) for o, i, bias in linear_shapes(config).values()) + len(NORMS) * h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * per_layer + h

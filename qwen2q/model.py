"""Qwen2ForCausalLM in plain PyTorch, with a static KV cache for incremental decoding.

Parameter names match Hugging Face checkpoints (`model.layers.0.self_attn.q_proj.weight`, ...), so a
safetensors state dict loads as it is.  The model knows nothing of quantization: quantized linears are
swapped in from outside (`qwen2q.quantized`), and anything with `forward(x) -> x @ W^T + b` works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2q.config import Qwen2Config
from qwen2q.rope import QKRotation, RotaryEmbedding


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the statistics in fp32, the product in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)): the residual add and the norm after it, one kernel in `qwen2q.fused`."""
        x = x + delta
        return x, self(x)


class GatedSiLU(nn.Module):
    """silu(gate) * up, each rounded to the activations' dtype as PyTorch rounds it (one kernel in `qwen2q.fused`)."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class Projections(nn.Module):
    """Linears that read the same input (an attention's q, k, v; an MLP's gate and up): their outputs, in order.  A
    module so that one launch for all of them can replace it (`qwen2q.fused`); the linears stay the parent's own,
    `names` says which."""

    def __init__(self, *names: str):
        super().__init__()
        self.names = names

    def forward(self, x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
        return tuple(linear(x) for linear in linears)


class CacheAttention(nn.Module):
    """The static path's attention: q [B, H, T, D] over a layer's whole cache buffers [B, H_kv, max_len, D] under
    `mask` (boolean or additive [T, max_len], made from `positions` and `window` by `static_attention_mask`).  A
    module so that a kernel reading only the positions each query sees can replace it (`qwen2q.fused`)."""

    def forward(self, q, k, v, mask: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class KVCache:
    """Preallocated keys and values for every layer: [B, n_kv_heads, max_len, head_dim] each.

    `length` counts the positions already written; a forward with a cache writes its T new positions
    after them and attends over everything written so far.
    """

    def __init__(self, config: Qwen2Config, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, T, D] at positions length..length+T; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step needs {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def write_at(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Static-shape variant for CUDA graphs: store k, v at `positions` (int64 [T], a device tensor)
        and return the whole buffers [B, n_kv, max_len, D]; the caller masks what is not written yet."""
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer], self.v[layer]


def static_attention_mask(positions: torch.Tensor, max_len: int, window: int | None) -> torch.Tensor:
    """Boolean [T, max_len] mask for queries at `positions` (int64 [T]) over a whole static cache."""
    q = positions[:, None]
    k = torch.arange(max_len, device=positions.device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def attention_mask(start: int, T: int, S: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [T, S] mask (True = attend) for queries at positions start..start+T over keys 0..S.

    None when plain causal attention over all keys is exact, so SDPA can take its fast path.
    """
    if window is None or S <= window:
        if T == 1:
            return None
        if start == 0 and T == S:
            return None
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window if config.is_sliding_layer(layer_idx) else None
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)
        self.project = Projections("q_proj", "k_proj", "v_proj")
        self.rotate = QKRotation()
        self.attend_cache = CacheAttention()

    def forward(self, x, cos, sin, cache: KVCache | None, start: int, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None):
        """start: position of x's first token (dynamic path); positions: int64 [T] device tensor instead
        (static path for CUDA graphs: fixed shapes, the cache read whole under a mask), with `mask` its
        `static_attention_mask` if the caller made it already (once per step for every layer)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if positions is not None:
            q, k, v = self.rotate.into_cache(q, k, v, cos, sin, cache, self.layer_idx, positions)
            if mask is None:
                mask = static_attention_mask(positions, cache.max_len, self.window)
            y = self.attend_cache(q, k, v, mask, positions, self.window)
        else:
            q, k = self.rotate(q, k, cos, sin)
            if cache is not None:
                k, v = cache.write(self.layer_idx, k, v)
            mask = attention_mask(start, T, k.shape[2], self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.project = Projections("gate_proj", "up_proj")
        self.act = GatedSiLU()

    def forward(self, x):
        return self.down_proj(self.act(*self.project(x, self.gate_proj, self.up_proj)))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, start=0, positions=None, mask=None):
        x, delta = self.residual_stream(x, None, cos, sin, cache, start, positions, mask)
        return x + delta

    def residual_stream(self, x, delta, cos, sin, cache=None, start=0, positions=None, mask=None):
        """(x', mlp output) with x' + mlp output the layer's output for input x + delta (x alone when delta is
        None): the last residual add is left to the caller, who does it with the next norm (`add_and_norm`)."""
        x, h = (x, self.input_layernorm(x)) if delta is None else self.input_layernorm.add_and_norm(x, delta)
        x, h = self.post_attention_layernorm.add_and_norm(
            x, self.self_attn(h, cos, sin, cache, start, positions, mask))
        return x, self.mlp(h)


class Qwen2Model(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)


class Qwen2ForCausalLM(nn.Module):
    """Causal LM.  forward(input_ids int64 [B, T]) -> logits [B, T, vocab] in the model's dtype."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, p.dtype, p.device)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] for `input_ids` [B, T], appended to `cache` if given.

        With `positions` (int64 [T] on the device) the tokens are written at those cache positions with
        fixed shapes and no host-side bookkeeping, so the step can be captured in a CUDA graph; the
        caller tracks the length.  Dynamic YaRN is not applied on that path.
        """
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if positions is not None:
            if cache is None:
                raise ValueError("positions= needs a cache")
            cos, sin = self.model.rotary(positions.expand(B, T), x.dtype)
            masks: dict[int | None, torch.Tensor] = {}  # one mask per window size, shared by the layers
            delta = None  # each layer's last residual add is done with the next norm
            for layer in self.model.layers:
                window = layer.self_attn.window
                if window not in masks:  # additive, in x's dtype: SDPA converts a boolean one in every call
                    allowed = static_attention_mask(positions, cache.max_len, window)
                    masks[window] = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                        ~allowed, float("-inf"))
                x, delta = layer.residual_stream(x, delta, cos, sin, cache, 0, positions, masks[window])
            return self._final_norm(x, delta)
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary(pos, x.dtype, seq_end=start + T)
        delta = None
        for layer in self.model.layers:
            x, delta = layer.residual_stream(x, delta, cos, sin, cache, start)
        if cache is not None:
            cache.length = start + T
        return self._final_norm(x, delta)

    def _final_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """The final norm of x + delta, the last layer's residual add done with it."""
        return self.model.norm(x) if delta is None else self.model.norm.add_and_norm(x, delta)[1]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                positions: torch.Tensor | None = None):
        """Logits [B, T, vocab] (or [B, 1, vocab] with `last_only`), in the parameters' dtype."""
        h = self.hidden_states(input_ids, cache, positions)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

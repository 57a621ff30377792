"""Token generation: greedy or sampled (temperature, top-k, top-p), stop tokens, streaming.

The prompt is prefilled once into a static KV cache; each step then feeds one token.  Sampling
order follows transformers: temperature, then top-k, then top-p.

Generation never runs past the model's context (`config.max_position_embeddings` positions, prompt
included): a prompt longer than the context is a `ContextError`; asking for more new tokens than fit
generates up to the context and then issues a `ContextLimitWarning` through `warnings.warn` (the
`qwen2q` command prints it as one `warning:` line).  Tokens past the context would use positions the
model was never trained on, and its output degenerates.
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Callable

import torch

from qwen2q.decode import StaticDecoder
from qwen2q.errors import Qwen2qError
from qwen2q.model import Qwen2ForCausalLM
from qwen2q.sampling import SamplingParams


class ContextError(Qwen2qError):
    """The prompt alone does not fit the model's context."""


class TokenIdError(Qwen2qError):
    """Prompt token ids that are not integers in [0, vocab_size)."""


class ContextLimitWarning(UserWarning):
    """Generation stopped at the model's context before max_new_tokens were generated."""


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids int64 [B]."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the ones before it already reach top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(
    model: Qwen2ForCausalLM,
    prompt_ids: list[int],
    params: SamplingParams,
    stop_ids: list[int] = (),
    on_token: Callable[[int], None] | None = None,
    static: bool | None = None,
) -> list[int]:
    """Generate up to `params.max_new_tokens` ids after `prompt_ids` (batch 1).

    static: decode through `StaticDecoder`'s fixed-shape step, replayed as a CUDA graph on CUDA (one graph
    launch per token where the ordinary path launches every kernel of every layer); None (default) does so on
    CUDA, where it is the fast path, unless the model asks for dynamic YaRN, and runs the ordinary path elsewhere.

    Stops after emitting a stop id (which is included in the result), or when prompt + new ids fill
    the model's context (`config.max_position_embeddings`): then, if fewer than max_new_tokens were
    generated, a `ContextLimitWarning` is issued.  `on_token` is called with each new id as soon as it
    is chosen, for streaming.  Raises `ContextError` for a prompt longer than the context and
    `TokenIdError` for ids outside [0, vocab_size).
    """
    prompt_ids = check_prompt_ids(prompt_ids, model.config.vocab_size)
    context = model.config.max_position_embeddings
    if len(prompt_ids) > context:
        raise ContextError(f"the prompt has {len(prompt_ids)} tokens, more than the model's context of {context}")
    n_new = min(params.max_new_tokens, context - len(prompt_ids))
    device = model.model.embed_tokens.weight.device
    max_len = len(prompt_ids) + n_new
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    stops = set(stop_ids)
    if static is None:  # dynamic YaRN rescales by length, which the fixed-shape step does not
        static = device.type == "cuda" and not model.config.rope.dynamic
    step = _decoder(model, tokens, max_len, static)
    logits = step(None)
    for i in range(n_new):
        tok = next_token(logits, params, generator)
        tid = int(tok.item())
        out.append(tid)
        if on_token is not None:
            on_token(tid)
        if tid in stops:
            return out
        if i + 1 < n_new:
            logits = step(tok.view(1, 1))
    if n_new < params.max_new_tokens:
        warnings.warn(f"stopped at the model's context of {context} tokens: {len(prompt_ids)} prompt + {n_new} new "
                      f"tokens, not the {params.max_new_tokens} new tokens asked for", ContextLimitWarning,
                      stacklevel=3)  # the caller's line, past inference_mode's wrapper
    return out


def _decoder(model: Qwen2ForCausalLM, prompt: torch.Tensor, max_len: int, static: bool):
    """step(token int64 [1, 1] or None) -> logits [1, vocab]: None prefills `prompt` [1, T], a token decodes one
    position, through `StaticDecoder` (static) or the ordinary path, over a cache of max_len positions."""
    if static:
        decoder = StaticDecoder(model, max_len)
        return lambda token: decoder.prefill(prompt) if token is None else decoder.step(token)
    cache = model.new_cache(1, max_len)
    return lambda token: model(prompt if token is None else token, cache=cache, last_only=True)[:, -1]


def check_prompt_ids(prompt_ids, vocab_size: int) -> list[int]:
    """A non-empty sequence of integer token ids in [0, vocab_size) -> list[int]; TokenIdError otherwise.

    Accepts a list/tuple of ints or a 1-D integer tensor/array."""
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__len__"):
        raise TokenIdError(f"the prompt must be text or a list of token ids, got {type(prompt_ids).__name__}")
    if len(prompt_ids) == 0:
        raise Qwen2qError("the prompt is empty")
    ids = list(prompt_ids)
    for i, t in enumerate(ids):
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)  # int, numpy integer, one-element integer tensor
        except TypeError:
            raise TokenIdError(f"token id {i} is not an integer: {t!r}") from None
        if not 0 <= t < vocab_size:
            raise TokenIdError(f"token id {i} is {t}, outside the vocabulary [0, {vocab_size})")
        ids[i] = t
    return ids


class TextStream:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        self.decode, self.write = decode, write
        self.ids: list[int] = []
        self.emitted = 0

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.emitted :])
        self.emitted = len(text)

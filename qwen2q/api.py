"""The Python entry point: `qwen2q.load(path)` -> a `QwenModel` with generate() and chat()."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from qwen2q.config import Qwen2Config
from qwen2q.devices import parse_device
from qwen2q.errors import Qwen2qError
from qwen2q.files import DEFAULT_MODEL  # re-exported: qwen2q.api.DEFAULT_MODEL
from qwen2q.generation import ContextError, TextStream, generate_ids
from qwen2q.loader import load_model
from qwen2q.model import Qwen2ForCausalLM
from qwen2q.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from qwen2q.tokenizer import Tokenizer, check_messages


class QwenModel:
    """A loaded checkpoint: `model` (a Qwen2ForCausalLM), `tokenizer`, `config` and `path`."""

    def __init__(self, model: Qwen2ForCausalLM, tokenizer: Tokenizer, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.config: Qwen2Config = model.config

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> str:
        """Continue `prompt` (text, or token ids) and return the new text, without stop tokens.

        temperature 0 is greedy.  With `stream=True` the text is also written to stdout as it comes;
        `on_token` is called with each new token id as soon as it is chosen (a `TextStream` turns ids into text).
        Generation stops at the model's context (config.max_position_embeddings, prompt included), with a
        `qwen2q.generation.ContextLimitWarning` (warnings.warn) if that cut max_new_tokens short; a prompt
        longer than the context raises ContextError.
        """
        ids = self.generate_ids(prompt, max_new_tokens, temperature, top_k, top_p, seed, stream, on_token)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_ids(self, prompt, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0, top_k=0, top_p=1.0,
                     seed=None, stream=False, on_token=None) -> list[int]:
        """Like `generate`, but returns the new token ids (a final stop token included)."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt  # ids checked by generate_ids
        if stream:
            shown, also = self.text_stream(lambda s: (sys.stdout.write(s), sys.stdout.flush())), on_token
            on_token = shown if also is None else lambda t: (shown(t), also(t))
        return generate_ids(self.model, ids, params, self.tokenizer.stop_ids, on_token)

    def text_stream(self, write: Callable[[str], None]) -> TextStream:
        """An `on_token` callback that passes `write` the text of the new ids as it completes (special tokens
        left out, as `generate` returns them); its `.ids` are the ids seen so far."""
        return TextStream(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), write)

    def chat(self, messages: list[dict], **sampling) -> str:
        """Answer a conversation ([{"role": "user", "content": ...}, ...]) through the chat template.

        `sampling` takes `generate`'s keywords.  Past the context it behaves as `generate`; `fit_chat` first
        trims a history that has grown too long."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, **sampling)

    def fit_chat(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], int]:
        """(the newest part of `messages` whose prompt + `max_new_tokens` fits the context, turns dropped).

        A turn is a user message and the messages after it up to the next user message (its reply); the
        oldest go first and a leading system message always stays.  Raises ContextError when even the
        last turn alone does not fit."""
        check_messages(messages)
        context = self.config.max_position_embeddings
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        rest, dropped = messages[len(head):], 0
        while True:
            n = len(self.tokenizer.encode(self.tokenizer.apply_chat_template(head + rest)))
            if n + max_new_tokens <= context:
                return head + rest, dropped
            nxt = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
            if nxt is None:
                raise ContextError(f"the message does not fit: {n} prompt tokens (chat template included) + "
                                   f"{max_new_tokens} new tokens > the model's context of {context}; not sent")
            rest, dropped = rest[nxt:], dropped + 1


def load(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    allow_non_finite: bool = False,
    cpu_cache: str | None = None,
) -> QwenModel:
    """Load a Qwen2 checkpoint directory (default: the embedded tiny model).

    `dtype` defaults to the checkpoint's own (bf16 for most); "float32"/"float16"/"bfloat16" override
    it.  Quantized checkpoints (bitsandbytes NF4/int8, AWQ) load into quantized modules.  Tensors whose
    names, shapes or dtypes do not match config.json, and NaN/Inf weights, are refused (a Qwen2qError);
    `allow_non_finite=True` accepts NaN/Inf.

    On CPU in bf16 the quantized linears run the CPU backend (`qwen2q.kernels.cpu`), from weights repacked once
    here: int4 adds torch's repacked copy (about 0.6 bytes per weight), int8 a scale per row, NF4 its decoded
    absmax (1/16 byte per weight).  `cpu_cache="bf16"` instead keeps a dequantized bf16 copy of each quantized
    linear (2 bytes per weight more; the speed of a bf16 model, NF4's only way to it).
    """
    device = parse_device(device)  # one line naming a bad device, before any file is read
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise Qwen2qError(f"dtype must be a string like 'bfloat16' or a torch.dtype, got {type(dtype).__name__}")
    path = Path(path) if path is not None else DEFAULT_MODEL
    model = load_model(path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                       allow_non_finite=allow_non_finite, cpu_cache=cpu_cache)
    return QwenModel(model, Tokenizer(path), path)

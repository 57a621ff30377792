"""The Python entry point: `qwen2q.load(path)` -> a `QwenModel` with generate() and chat()."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from qwen2q.config import Qwen2Config
from qwen2q.generation import SamplingParams, TextStream, generate_ids
from qwen2q.loader import load_model
from qwen2q.model import Qwen2ForCausalLM
from qwen2q.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "assets" / "qwen2-tiny"


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
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: bool = False,
    ) -> str:
        """Continue `prompt` (text, or token ids) and return the new text, without stop tokens.

        temperature 0 is greedy.  With `stream=True` the text is also written to stdout as it comes.
        """
        ids = self.generate_ids(prompt, max_new_tokens, temperature, top_k, top_p, seed, stream)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_ids(self, prompt, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                     stream=False) -> list[int]:
        """Like `generate`, but returns the new token ids (a final stop token included)."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        on_token = None
        if stream:
            decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
            on_token = TextStream(decode, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        return generate_ids(self.model, ids, params, self.tokenizer.stop_ids, on_token)

    def chat(self, messages: list[dict], **sampling) -> str:
        """Answer a conversation ([{"role": "user", "content": ...}, ...]) through the chat template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, **sampling)


def load(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    allow_non_finite: bool = False,
) -> QwenModel:
    """Load a Qwen2 checkpoint directory (default: the embedded tiny model).

    `dtype` defaults to the checkpoint's own (bf16 for most); "float32"/"float16"/"bfloat16" override
    it.  Quantized checkpoints (bitsandbytes NF4/int8, AWQ) load into quantized modules.  Tensors whose
    names, shapes or dtypes do not match config.json, and NaN/Inf weights, are refused (a Qwen2qError);
    `allow_non_finite=True` accepts NaN/Inf.
    """
    path = Path(path) if path is not None else DEFAULT_MODEL
    model = load_model(path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                       allow_non_finite=allow_non_finite)
    return QwenModel(model, Tokenizer(path), path)

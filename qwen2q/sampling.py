"""How tokens are drawn: `SamplingParams` and its defaults, one definition for the Python API and the command.

Torch-free, so the `qwen2q` command's options read these defaults without importing torch at start-up.
"""
from __future__ import annotations

import dataclasses

from qwen2q.errors import Qwen2qError

DEFAULT_MAX_NEW_TOKENS = 256  # QwenModel.generate/chat and `qwen2q generate`/`chat --max-new-tokens`


@dataclasses.dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise Qwen2qError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise Qwen2qError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise Qwen2qError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Qwen2qError(f"top_p must be in (0, 1], got {self.top_p}")

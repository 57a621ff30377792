"""Fixed-shape decoding: one-token steps that a CUDA graph can capture and replay.

The prompt is prefilled on the ordinary path; each following token runs the model's static path
(`positions=` a device tensor, the KV cache read whole under a mask), so every step has identical
shapes and no host-side state.  On CUDA the step is captured once into a CUDA graph and replayed,
removing the per-kernel launch overhead that dominates batch-1 decoding; elsewhere the same step runs
eagerly, which is how CI tests it.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from qwen2q.model import Qwen2ForCausalLM


class StaticDecoder:
    """Batch-1 decoder over a static KV cache of `max_len` positions."""

    def __init__(self, model: Qwen2ForCausalLM, max_len: int, use_graph: bool | None = None):
        self.model = model
        self.device = model.model.embed_tokens.weight.device
        self.cache = model.new_cache(1, max_len)
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None
        self.logits = None

    def _on_device(self):
        """Make the model's GPU current (capture, replay and the Triton launches run on the current device, which
        need not be the model's: cuda:1 on a multi-GPU host)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """prompt_ids int64 [1, T] -> logits of the last position [1, vocab]."""
        self.cache.length = 0
        with self._on_device():
            return self.model(prompt_ids.to(self.device), cache=self.cache, last_only=True)[:, -1]

    def _step(self) -> torch.Tensor:
        return self.model(self.token, cache=self.cache, last_only=True, positions=self.position)[:, -1]

    @torch.inference_mode()
    def _capture(self) -> None:
        self.position.fill_(self.cache.max_len - 1)  # warm-up writes land past every real position so far
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # let lazy initialisation (Triton compiles, cuBLAS handles) happen outside capture
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed `token` (int64 [1, 1]) at the next position; return logits [1, vocab] (a reused buffer on CUDA)."""
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"static KV cache of {self.cache.max_len} positions is full")
        with self._on_device():
            self.token.copy_(token)
            self.position.fill_(self.cache.length)
            if self.use_graph and self.graph is None:
                try:
                    self._capture()
                except RuntimeError as e:  # an op that cannot be captured: decode on, without the graph
                    warnings.warn(f"decoding without a CUDA graph: capturing the decode step failed ({e})",
                                  RuntimeWarning, stacklevel=2)
                    self.use_graph, self.graph = False, None
                self.token.copy_(token)
                self.position.fill_(self.cache.length)
            if self.use_graph:
                self.graph.replay()
                out = self.logits
            else:
                out = self._step()
        self.cache.length += 1
        return out

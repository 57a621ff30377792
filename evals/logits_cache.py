"""The reference model's logits, computed once per window and replayed for every candidate.

`qwen2q eval A B --reference R` compares each candidate with R window by window; without a cache R would
run once for its own perplexity and again inside every comparison (N + 1 passes for N candidates).
`CachedLogits` wraps R: the first call for a window runs it and keeps the logits exactly as returned
(the model's own dtype, so nothing is rounded), later calls with the same token ids replay them.

Bounded: windows are kept in memory up to `memory_bytes`, then in a private temporary folder (deleted on
`close()`) while the disk keeps `disk_margin_bytes` free; past both, a window is not kept and simply runs
again when asked for (the old cost, never an error).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MEMORY_BYTES = 2 * 2**30
DEFAULT_DISK_MARGIN_BYTES = 2 * 2**30


class CachedLogits:
    """model(input_ids [B, T]) -> logits [B, T, V], replaying logits already computed for the same ids."""

    def __init__(self, model, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 disk_margin_bytes: int = DEFAULT_DISK_MARGIN_BYTES):
        self.model, self.memory_bytes, self.disk_margin_bytes = model, memory_bytes, disk_margin_bytes
        self._memory: dict[bytes, torch.Tensor] = {}
        self._disk: dict[bytes, Path] = {}
        self._held = 0
        self._folder: Path | None = None
        self.runs = self.replays = 0

    def parameters(self):
        return self.model.parameters()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        key = _key(ids)
        if key in self._memory:
            self.replays += 1
            return self._memory[key]
        if key in self._disk:
            self.replays += 1
            return torch.load(self._disk[key], map_location=ids.device, weights_only=True)
        logits = self.model(ids)
        self.runs += 1
        self._keep(key, logits)
        return logits

    def _keep(self, key: bytes, logits: torch.Tensor) -> None:
        size = logits.numel() * logits.element_size()
        if self._held + size <= self.memory_bytes:
            self._memory[key] = logits.detach()
            self._held += size
            return
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="qwen2q-reference-logits-"))
        if shutil.disk_usage(self._folder).free - size < self.disk_margin_bytes:
            return  # no room: this window runs again when asked for
        path = self._folder / f"{len(self._disk)}.pt"
        torch.save(logits.detach().cpu(), path)
        self._disk[key] = path

    def close(self) -> None:
        """Forget every kept window and delete the temporary folder (ours alone: made by mkdtemp)."""
        self._memory.clear()
        self._disk.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "CachedLogits":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key(ids: torch.Tensor) -> bytes:
    """The token ids themselves (shape and values) identify a window: an exact key, no hash collisions."""
    ids = ids.detach().to("cpu", torch.int64).contiguous()
    return repr(tuple(ids.shape)).encode() + ids.numpy().tobytes()

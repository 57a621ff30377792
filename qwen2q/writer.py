"""Writing a checkpoint directory: output shards of a bounded size, side files, config.json last, and the
destination rules of `qwen2q.destination` (nothing the user owns is replaced or lost).

Quantized tensors collect into an output shard that is written once it passes `max_shard_bytes`, so
peak memory stays near one output shard whatever the model's size.  Everything is written into a hidden
partial directory beside DST and renamed into place only when complete; config.json is written last, so
an interrupted run never leaves a directory that loads as a checkpoint.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import torch

from qwen2q.checkpoint import save_safetensors
from qwen2q.destination import (
    SIDE_FILES,
    EXTRA_FILES,
    DestinationLock,
    check_destination,
    discard_partial,
    install,
    start_partial,
    writing,
)

DEFAULT_SHARD_BYTES = 4 * 2**30


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _ShardWriter:
    """Collects tensors and writes `model-XXXXX.safetensors` files of about `limit` bytes each."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit = out, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        with writing(self.out / name):
            save_safetensors(self.pending, self.out / name)
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Give the shards their final names and write the index when there is more than one."""
        self.flush()
        if len(self.files) == 1:
            os.replace(self.out / self.files[0][0], self.out / "model.safetensors")
            return 1
        n = len(self.files)
        weight_map = {}
        for i, (name, keys) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / name, self.out / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        with writing(self.out / "model.safetensors.index.json"):
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n


class CheckpointWriter:
    """Writes a checkpoint directory without risking what is already there (`qwen2q.destination`):
    DST is checked on construction, before any work; entering locks DST and creates the hidden partial
    directory the shards stream into; `finish(config)` copies the side files from `src`, writes
    config.json last and moves the directory into place.  Leaving the `with` block early (an error,
    Ctrl-C) deletes the partial directory; a killed process leaves one without config.json, which the
    next run into DST removes."""

    def __init__(self, src: Path, dst: Path, force: bool, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        check_destination(src, dst, force)
        self.src, self.dst, self.force = src, dst, force
        self.max_shard_bytes = max_shard_bytes

    def __enter__(self) -> "CheckpointWriter":
        self.lock = DestinationLock(self.dst).__enter__()
        try:
            check_destination(self.src, self.dst, self.force)  # again: it may have changed before we locked
            self.tmp = start_partial(self.dst)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        self.shards = _ShardWriter(self.tmp, self.max_shard_bytes)
        return self

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.shards.add(tensors)

    def source_card(self) -> str | None:
        """The source's README.md (its model card), or None."""
        card = self.src / "README.md"
        return card.read_text(errors="replace") if card.is_file() else None

    def finish(self, config: dict, card: str | None = None, extras: dict[str, str] | None = None) -> int:
        """Complete the checkpoint with `config` as config.json, `card` as README.md (None: the source's
        copied) and `extras` ({file name: text}, e.g. a mixed-precision profile); return the number of shards."""
        n = self.shards.finish()
        with writing(self.tmp):
            for name, text in (extras or {}).items():
                if name not in EXTRA_FILES:  # only names `is_qwen2q_checkpoint` knows as ours
                    raise ValueError(f"extra file {name!r} is not one of {EXTRA_FILES}")
                (self.tmp / name).write_text(text)
            for side in SIDE_FILES:
                if side == "README.md" and card is not None:
                    (self.tmp / side).write_text(card)
                elif (self.src / side).is_file():
                    shutil.copy2(self.src / side, self.tmp / side)
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # last: only now it loads
        install(self.tmp, self.dst, self.force)
        return n

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                discard_partial(self.tmp)
        finally:
            self.lock.__exit__(None, None, None)

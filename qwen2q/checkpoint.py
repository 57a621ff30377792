"""Reading and writing Hugging Face checkpoint directories (safetensors, single file or sharded).

Loading builds the model on the meta device and fills it tensor by tensor from memory-mapped files,
so host memory peaks near the model's own size, never at twice it.  Pickle checkpoints (`*.bin`)
can execute code when read and are refused unless the caller opts in.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qwen2q.errors import Qwen2qError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: str | Path) -> Path:
    """The path as a Path, or a one-line error if it is not an existing directory with a config.json."""
    p = Path(path)
    if not p.exists():
        raise Qwen2qError(f"{p}: no such directory")
    if not p.is_dir():
        raise Qwen2qError(f"{p}: not a directory (give the checkpoint directory, not a file in it)")
    if not (p / "config.json").is_file():
        raise Qwen2qError(f"{p}: no config.json; not a Hugging Face checkpoint directory")
    return p


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in index order, each checked to exist."""
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise Qwen2qError(f"{path / INDEX_FILE}: not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise Qwen2qError(f"{path}: shard(s) named in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise Qwen2qError(
                f"{path} holds only pickle weights ({pickles[0].name}), which can run code when loaded; "
                "convert them to safetensors or pass allow_pickle=True (CLI: --allow-pickle) if you trust the source"
            )
        return pickles
    raise Qwen2qError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or pytorch_model*.bin found")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from each file in turn; safetensors are memory-mapped, one tensor at a time."""
    for f in files:
        if f.suffix == ".bin":
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        except SafetensorError as e:
            raise Qwen2qError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None


def tensor_names(files: list[Path]) -> list[str]:
    names: list[str] = []
    for f in files:
        if f.suffix == ".bin":
            names += list(torch.load(f, map_location="meta", weights_only=True, mmap=True))
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                names += list(sf.keys())
        except SafetensorError as e:
            raise Qwen2qError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None
    return names


def fill_module(model: nn.Module, tensors, dtype: torch.dtype, device, ignore=()) -> None:
    """Assign checkpoint tensors to a model built on the meta device.

    Floating-point tensors are cast to `dtype`; integer tensors keep theirs.  A module that owns
    tensors with dotted names (quantized linears: `weight.absmax`, ...) takes them through its
    `load_checkpoint_tensor(suffix, tensor)` method.  Every parameter and persistent buffer must be
    filled; unknown names are an error.
    """
    modules = dict(model.named_modules())
    unexpected = []
    for name, t in tensors:
        if name in ignore:
            continue
        prefix, _, attr = name.rpartition(".")
        owner = None
        while prefix:
            if prefix in modules and hasattr(modules[prefix], "load_checkpoint_tensor"):
                owner = modules[prefix]
                attr = name[len(prefix) + 1 :]
                break
            prefix = prefix.rpartition(".")[0]
        if owner is None:
            prefix, _, attr = name.rpartition(".")
            owner = modules.get(prefix)
        if owner is None:
            unexpected.append(name)
            continue
        if hasattr(owner, "load_checkpoint_tensor"):  # it keeps or casts its tensors' dtypes itself
            owner.load_checkpoint_tensor(attr, t.to(device))
            continue
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = t
        else:
            unexpected.append(name)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise Qwen2qError(f"checkpoint has {len(unexpected)} tensor(s) the model does not know: {shown}")


def check_filled(model: nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise Qwen2qError(f"checkpoint lacks {len(missing)} tensor(s): {shown}")


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write one safetensors file; tensors are made contiguous and distinct (tied weights saved once by the caller)."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(state, str(path), metadata=metadata or {"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates files 0600; give them the usual mode


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class TensorIndex:
    """Random access to a checkpoint's tensors by name, memory-mapped, one tensor read at a time."""

    def __init__(self, files: list[Path]):
        self._files: dict[str, Path] = {}
        for f in files:
            if f.suffix == ".bin":
                raise Qwen2qError(f"{f}: random access needs safetensors; convert pickle checkpoints first")
            try:
                with safe_open(str(f), framework="pt") as sf:
                    self._files.update({name: f for name in sf.keys()})
            except SafetensorError as e:
                raise Qwen2qError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None
        self._open: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        f = self._files.get(name)
        if f is None:
            raise Qwen2qError(f"checkpoint lacks tensor {name}")
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(name)

    def release(self) -> None:
        """Close the open files.  Each open file is one memory map, and every page read through it
        stays resident (counted in RSS) until it is unmapped, so a layer-by-layer reader calls this
        after each layer to keep host memory at one layer's worth.  A map lives on while a tensor
        read from it does; `get` reopens files as needed."""
        self._open.clear()

"""A checkpoint directory's files, read without torch: which weight files it has, its index, and the
safetensors headers (`qwen2q info` and the command line's quick checks need nothing more).

Nothing here follows a path outside the directory the user named: an index may name only plain file
names beside it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from qwen2q.errors import CheckpointError, Qwen2qError

DEFAULT_MODEL = Path(__file__).parent / "assets" / "qwen2-tiny"  # the embedded model (`qwen2q:tiny`)
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


def read_weight_map(path: Path) -> dict[str, str] | None:
    """The `weight_map` of `path`'s model.safetensors.index.json ({tensor name: shard file name}), or None
    without an index.  Every shard must be a plain file name in `path` (no separators, not absolute): an
    index must not reach files outside its checkpoint.  A shard may be a symlink (the hub cache links
    every file to a blob elsewhere); the name is what is checked, not where it resolves."""
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: needs a non-empty object \"weight_map\" of tensor name -> shard file name")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_path}: weight_map[{name!r}] is {json.dumps(shard)}, not a file name")
        if shard in ("", ".", "..") or any(c in shard for c in "/\\\0") or os.path.isabs(shard):
            raise CheckpointError(f"{index_path}: weight_map[{name!r}] = {shard!r} is not a plain file name in "
                                  f"{path}; an index may name only files beside it")
    return weight_map


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in index order, each checked to exist."""
    weight_map = read_weight_map(path)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) named in {INDEX_FILE} are missing: {', '.join(missing)}")
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


def read_safetensors_header(f: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of safetensors file `f`, from its header alone,
    checked against the file's size: a truncated or corrupt file is a one-line CheckpointError."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or not all(isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
                                  and len(v["data_offsets"]) == 2 for v in tensors.values()):
        raise CheckpointError(f"{f}: unreadable safetensors file, truncated or corrupt (malformed header)")
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{f}: truncated: its header describes {8 + n + end:,} bytes, the file has {size:,}")
    return tensors

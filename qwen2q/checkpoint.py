"""Reading and writing Hugging Face checkpoint directories (safetensors, single file or sharded).

Loading builds the model on the meta device and fills it tensor by tensor from memory-mapped files,
so host memory peaks near the model's own size, never at twice it.  Pickle checkpoints (`*.bin`)
can execute code when read and are refused unless the caller opts in.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qwen2q.config import Qwen2Config
from qwen2q.errors import CheckpointError, Qwen2qError
from qwen2q.files import INDEX_FILE, PICKLE_FILES, SINGLE_FILE, check_model_dir, read_weight_map, weight_files  # noqa: F401
from qwen2q.recipe import Recipe
from qwen2q.quantizers.checks import all_finite, serial
from qwen2q.validate import check_finite, check_index, check_tensors

def load_pickle(f: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint's {name: tensor}, memory-mapped, read with torch's weights-only unpickler.
    Anything it cannot read (the legacy non-zip format, which cannot be memory-mapped; a corrupt file; an
    object that is not a dict of tensors) is a one-line CheckpointError."""
    if not zipfile.is_zipfile(f):
        raise CheckpointError(f"{f}: not a zip-format torch.save file (a legacy pickle, or corrupt); qwen2q "
                              "memory-maps pickle weights, so re-save it with a current torch.save or convert "
                              "it to safetensors")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the file's problem
        raise CheckpointError(f"{f}: cannot read this pickle checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{f}: holds a {type(state).__name__}, not a dict of tensor name -> tensor")
    return state


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One stored tensor as its file header describes it: shape, dtype (a torch dtype, or the
    safetensors name of one torch lacks) and the file that holds it."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str
    file: Path


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of every tensor in `files`, from safetensors headers (no data is read; pickle
    files are memory-mapped).  A name stored twice is an error."""
    out: dict[str, TensorInfo] = {}

    def add(name, shape, dtype, f):
        if name in out:
            raise CheckpointError(f"tensor {name} is stored twice: in {out[name].file.name} and in {f.name}")
        out[name] = TensorInfo(tuple(shape), dtype, f)

    for f in files:
        if f.suffix == ".bin":
            for name, t in load_pickle(f).items():
                add(name, t.shape, t.dtype, f)
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    sl = sf.get_slice(name)
                    add(name, sl.get_shape(), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()), f)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None
    return out


OWN_MAP_BYTES = 2**20  # iter_tensors(own_memory=True) maps a tensor this big or bigger alone, copies a smaller one


def iter_tensors(files: list[Path], own_memory: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from each file in turn; safetensors are memory-mapped, one tensor at a time.

    By default every tensor of a safetensors file is a view of one map of the whole file, which stays
    mapped, with every page read through it counted in RSS, while any tensor read from it lives.
    own_memory=True makes tensors share no memory, for a reader that keeps some of them and drops the
    rest (a converter): a tensor of OWN_MAP_BYTES or more is a copy-on-write map of just its own bytes
    (an open file while it lives), so keeping it keeps only its own pages and dropping one releases its
    pages at once; a smaller tensor, and every tensor of a pickle file, is a copy."""
    for f in files:
        if f.suffix == ".bin":
            for name, t in load_pickle(f).items():
                yield name, t.clone() if own_memory else t
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                if own_memory:
                    yield from _own_memory_tensors(f, sf)
                    continue
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        except SafetensorError as e:
            raise Qwen2qError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None


def _own_memory_tensors(f: Path, sf) -> Iterator[tuple[str, torch.Tensor]]:
    """iter_tensors(own_memory=True) for safetensors file `f`, open as `sf` (which has checked its header:
    offsets in bounds, sizes matching dtypes and shapes), in `sf`'s order."""
    with open(f, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
        for name in sf.keys():
            info = header[name]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            begin, end = (8 + header_len + offset for offset in info["data_offsets"])
            if dtype is None or sys.byteorder != "little":
                yield name, sf.get_tensor(name).clone()
            elif end - begin < OWN_MAP_BYTES:
                yield name, _read_tensor(fh, begin, end, dtype, info["shape"])
            else:  # no local keeps the tensor: the reader's dropping it unmaps it
                yield name, _map_tensor(fh, begin, end, dtype, info["shape"])


def _read_tensor(fh, begin: int, end: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The tensor `dtype` `shape` stored at bytes [begin, end) of open file `fh`, read into memory of its own
    (a plain read: a torch copy of more than 32768 values would wait for every torch thread)."""
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    data = bytearray(end - begin)
    fh.seek(begin)
    if fh.readinto(data) != len(data):
        raise CheckpointError(f"{fh.name}: ends inside a tensor's data")
    return torch.frombuffer(data, dtype=dtype).view(shape)


def _map_tensor(fh, begin: int, end: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The tensor `dtype` `shape` stored at bytes [begin, end) of open file `fh`, as a copy-on-write map of
    those bytes that lives as long as the tensor (torch.frombuffer keeps a reference to the map)."""
    start = begin - begin % mmap.ALLOCATIONGRANULARITY  # a map starts on a page boundary
    view = mmap.mmap(fh.fileno(), end - start, access=mmap.ACCESS_COPY, offset=start)
    return torch.frombuffer(view, dtype=dtype, count=(end - begin) // dtype.itemsize,
                            offset=begin - start).view(shape)


def tensor_names(files: list[Path]) -> list[str]:
    names: list[str] = []
    for f in files:
        if f.suffix == ".bin":
            names += list(load_pickle(f))
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                names += list(sf.keys())
        except SafetensorError as e:
            raise Qwen2qError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None
    return names


def validate_checkpoint(path: Path, config: Qwen2Config, files: list[Path]) -> dict[str, TensorInfo]:
    """Check, from file headers only (no tensor data read), that the checkpoint at `path` holds exactly
    the tensors its config.json implies, each of the right shape and dtype, and that its index (if any)
    says truly where each is (rules: `qwen2q.validate`).  Returns the headers."""
    headers = read_headers(files)
    weight_map = read_weight_map(path)
    if weight_map is not None:
        check_index(weight_map, headers, str(path / INDEX_FILE))
    qcfg = Recipe.from_hf(config.quantization_config) if config.quantization_config else None
    check_tensors(config, headers, qcfg)
    return headers


def check_all_finite(files: list[Path]) -> None:
    """Read every tensor of `files` once (memory-mapped, one at a time) and refuse NaN/Inf, naming the
    file and tensor: a converter calls this before it writes anything.  One fast reduction per tensor
    (`all_finite`), in the calling thread only: the pass is memory-bound, and a sum forked onto every torch
    thread waits for a descheduled one on a busy machine (the real 0.5B's 1.2 GB on 2 cores: under load
    1.0-2.1 s on both threads, 0.35-0.39 s on one; idle 0.14-0.17 s and 0.20-0.23 s); the exact
    elementwise check only names what a failing one holds."""
    with serial():
        for f in files:
            for name, t in iter_tensors([f], own_memory=True):  # each tensor unmapped once checked: low RSS
                if all_finite(t):
                    continue
                try:
                    check_finite(name, t)
                except CheckpointError as e:
                    raise CheckpointError(f"{f}: {e}") from None


def fill_module(model: nn.Module, tensors, dtype: torch.dtype, device, ignore=(), allow_non_finite=False) -> None:
    """Assign checkpoint tensors to a model built on the meta device.

    Floating-point tensors are cast to `dtype`; integer tensors keep theirs.  A NaN/Inf value (stored,
    or made by the cast) is an error unless `allow_non_finite`.  A module that owns
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
            if not allow_non_finite:
                check_finite(name, t)
            owner.load_checkpoint_tensor(attr, t.to(device))
            continue
        stored, t = t, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if not allow_non_finite:
            check_finite(name, t, stored)
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


# The dtypes save_safetensors writes itself, in the order safetensors' serializer lays tensors out (wider
# dtypes first, then by name); a tensor of any other dtype sends the whole file to safetensors.save_file.
_LAYOUT_ORDER = (torch.int64, torch.float64, torch.float32, torch.int32, torch.bfloat16, torch.float16,
                 torch.int16, torch.int8, torch.uint8, torch.bool)
_LAYOUT_RANK = {dtype: rank for rank, dtype in enumerate(_LAYOUT_ORDER)}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# Bytes per write() call.  One call per tensor (what safetensors.save_file makes: 272 MB for an embedding)
# lets the kernel fill the page cache in 2 MiB folios; a virtual machine that reports free 2 MiB blocks to
# its host (virtio free page reporting) has to fault fresh host memory in under each of them.  Writing the
# real 0.5B's 862 MB int8 checkpoint took 2.3-3.2 s that way (1.1-1.5 s of it system time) and 0.45-0.56 s
# in 1 MiB writes (0.5-0.74 s in 256 KiB or 2 MiB writes), on a 2-core KVM guest.
WRITE_CHUNK_BYTES = 2**20


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write one safetensors file; tensors are made contiguous and distinct (tied weights saved once by the caller).

    The file is byte for byte what safetensors.torch.save_file writes (header, layout and padding),
    written in WRITE_CHUNK_BYTES pieces; what save_file would refuse or lay out otherwise (tensors that
    share memory, dtypes outside _LAYOUT_ORDER, metadata that is not str -> str) goes to save_file."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    metadata = metadata or {"format": "pt"}
    if _layout_known(state, metadata):
        _write_safetensors(state, path, metadata)
    else:
        save_file(state, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates files 0600; give them the usual mode


def _layout_known(state: dict[str, torch.Tensor], metadata: dict) -> bool:
    """Whether _write_safetensors writes what save_file would: str names and metadata, _LAYOUT_ORDER dtypes,
    and no two tensors in one storage (save_file refuses those; it ignores empty storages, as here)."""
    storages = [v.untyped_storage() for v in state.values()]
    stored = [st.data_ptr() for st in storages if st.data_ptr() and st.nbytes()]
    return (all(isinstance(k, str) for k in state) and all(v.dtype in _LAYOUT_RANK for v in state.values())
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
            and len(set(stored)) == len(stored))


def _write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """safetensors.torch.save_file(state, path, metadata) for contiguous CPU tensors of _LAYOUT_ORDER dtypes:
    an 8-byte little-endian header length, the JSON header (metadata, then each tensor's dtype, shape and
    [begin, end) byte offsets in layout order) padded with spaces to a multiple of 8 bytes, then the data."""
    names = sorted(state, key=lambda k: (_LAYOUT_RANK[state[k].dtype], k))
    header, offset = {"__metadata__": metadata}, 0
    for k in names:
        t = state[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb", buffering=WRITE_CHUNK_BYTES) as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for k in names:
            data = memoryview(state[k].reshape(-1).view(torch.uint8).cpu().numpy())  # the tensor's bytes, no copy
            for start in range(0, len(data), WRITE_CHUNK_BYTES):
                f.write(data[start:start + WRITE_CHUNK_BYTES])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class TensorIndex:
    """Random access to a checkpoint's tensors by name, memory-mapped, one tensor read at a time (pickle
    `.bin` files, which `weight_files` returns only when allowed, through torch's memory-mapped load)."""

    def __init__(self, files: list[Path]):
        self._files: dict[str, Path] = {}
        for f in files:
            if f.suffix == ".bin":
                self._files.update({name: f for name in load_pickle(f)})
                continue
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
            self._open[f] = load_pickle(f) if f.suffix == ".bin" else safe_open(str(f), framework="pt")
        opened = self._open[f]
        return opened[name] if isinstance(opened, dict) else opened.get_tensor(name)

    def release(self) -> None:
        """Close the open files.  Each open file is one memory map, and every page read through it
        stays resident (counted in RSS) until it is unmapped, so a layer-by-layer reader calls this
        after each layer to keep host memory at one layer's worth.  A map lives on while a tensor
        read from it does; `get` reopens files as needed."""
        self._open.clear()

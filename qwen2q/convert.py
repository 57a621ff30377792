"""`qwen2q quantize`: stream a bf16/fp16/fp32 checkpoint into a quantized one, shard by shard.

Source tensors are read memory-mapped one at a time; quantized tensors collect into an output shard
that is written once it passes `max_shard_bytes`, so peak memory stays near one output shard whatever
the model's size.  Everything is written into a hidden temporary directory beside DST and renamed into
place only when complete; config.json is written last, so an interrupted conversion never leaves a
directory that loads as a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from qwen2q._version import __version__
from qwen2q.architecture import LINEAR_WEIGHT
from qwen2q.checkpoint import (
    check_all_finite,
    check_model_dir,
    iter_tensors,
    save_safetensors,
    tensor_names,
    validate_checkpoint,
    weight_files,
)
from qwen2q.config import Qwen2Config
from qwen2q.destination import (
    SIDE_FILES,
    DestinationLock,
    check_destination,
    discard_partial,
    install,
    start_partial,
    writing,
)
from qwen2q.errors import Qwen2qError
from qwen2q.qconfig import QuantConfig
from qwen2q.qlinear import quantize_linear
from qwen2q.validate import check_finite

DEFAULT_SHARD_BYTES = 4 * 2**30


@dataclasses.dataclass
class ConversionReport:
    method: str
    seconds: float
    bytes_before: int
    bytes_after: int
    quantized_weights: int  # elements of the quantized linears
    quantized_bytes: int  # bytes of their stored tensors (codes, scales, zeros, statistics)
    peak_rss_bytes: int
    shards: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)


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

    def finish(self, config: dict) -> int:
        """Complete the checkpoint with `config` as config.json; return the number of shards."""
        n = self.shards.finish()
        with writing(self.tmp):
            for side in SIDE_FILES:
                if (self.src / side).is_file():
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


def read_source(src, allow_pickle: bool = False, allow_non_finite: bool = False
                ) -> tuple[Path, Qwen2Config, list[Path]]:
    """Check that `src` is an unquantized checkpoint whose tensors' names, shapes and dtypes match its
    config.json (file headers) and whose values are finite (unless `allow_non_finite`), all before any
    work starts; return its path, config and weight files (pickle `pytorch_model*.bin` files only with
    `allow_pickle`: reading them can run code)."""
    src = check_model_dir(src)
    config = Qwen2Config.from_file(src / "config.json")
    if config.quantization_config:
        raise Qwen2qError(f"{src} is already quantized ({config.quantization_config.get('quant_method')}); "
                          "give a bf16/fp16/fp32 checkpoint")
    files = weight_files(src, allow_pickle=allow_pickle)
    validate_checkpoint(src, config, files)
    if not allow_non_finite:
        check_all_finite(files)
    return src, config, files


def quantized_config(config: Qwen2Config, qcfg: QuantConfig, src: Path, **note) -> dict:
    """config.json for the output: the source's, plus quantization_config and a note of how it was made."""
    cfg = config.to_dict()
    cfg["quantization_config"] = qcfg.to_hf()
    cfg["qwen2q"] = {"version": __version__, "method": qcfg.method, "source": src.name,
                     "group_size": qcfg.params.get("group_size"), **note}
    return cfg


def with_source_dtype(qcfg: QuantConfig, config: Qwen2Config) -> QuantConfig:
    """Peers compute in the checkpoint's dtype: record it as the bitsandbytes compute dtype."""
    if config.dtype in ("bfloat16", "float16", "float32"):
        return dataclasses.replace(qcfg, compute_dtype=config.dtype)
    return qcfg


def is_quantized_linear(name: str, qcfg: QuantConfig) -> bool:
    """Whether tensor `name` is the weight of a decoder linear that `qcfg` quantizes."""
    return bool(LINEAR_WEIGHT.match(name)) and qcfg.format_for(name[: -len(".weight")]) is not None


def passthrough(name: str, tensor: torch.Tensor, qcfg: QuantConfig, config: Qwen2Config,
                allow_non_finite: bool = False) -> dict:
    """How a tensor that is not quantized is stored: as it is, a tied lm_head not at all, and the bias of a
    quantized linear in its format's bias dtype (AWQ's WQLinear_GEMM keeps it fp16).  `read_source` has
    proved every stored value finite (unless `allow_non_finite`), so only that cast can add NaN/Inf: a cast
    tensor is checked again, unless `allow_non_finite`.  A tensor kept as it is is `tensor` itself, not a
    copy, so it should own its memory (iter_tensors(own_memory=True)) rather than pin a map of its file."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return {}
    out = tensor
    owner = qcfg.format_for(name[: -len(".bias")]) if name.endswith(".bias") and \
        is_quantized_linear(name[: -len(".bias")] + ".weight", qcfg) else None
    if owner is not None and owner[0].bias_dtype is not None:
        out = tensor.to(owner[0].bias_dtype)
        if not allow_non_finite:
            check_finite(name, out, tensor)
    return {name: out}


def check_plan(names: list[str], qcfg: QuantConfig) -> None:
    """Refuse, before any work, a `skip` entry that names no decoder linear of the checkpoint (tensor
    `names`) and a plan that would quantize nothing at all."""
    linears = [n[: -len(".weight")] for n in names if LINEAR_WEIGHT.match(n)]
    unused = qcfg.unused_skips(linears)
    if unused:
        example = linears[0].rsplit(".", 1)[-1] if linears else "down_proj"
        raise Qwen2qError(f"--skip {unused[0]} matches no linear of this model (give a module name or suffix "
                          f"such as {example} or mlp.{example}, or a prefix such as model.layers.0)")
    if not any(not qcfg.skips(n) for n in linears):
        raise Qwen2qError("--skip leaves no linear to quantize; the output would be the source in a new format")


def convert(src, dst, qcfg: QuantConfig, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: bool = True, allow_pickle: bool = False, allow_non_finite: bool = False) -> ConversionReport:
    """Quantize checkpoint `src` into the new directory `dst` with `qcfg` (round-to-nearest methods).

    Everything is checked before the first tensor is written: the source (names, shapes, dtypes, finite
    values), the plan and the destination.  `allow_non_finite` lets NaN/Inf through in the tensors kept
    unquantized (quantized linears need finite weights)."""
    from tqdm import tqdm

    if qcfg.method == "awq":
        raise Qwen2qError("AWQ needs calibration: use qwen2q.calibrate.awq_convert (CLI: --method awq)")
    src, config, files = read_source(src, allow_pickle=allow_pickle, allow_non_finite=allow_non_finite)
    dst = Path(dst)
    names = tensor_names(files)
    check_plan(names, qcfg)
    qcfg = with_source_dtype(qcfg, config)
    start = time.perf_counter()
    q_elems = q_bytes = 0
    with CheckpointWriter(src, dst, force, max_shard_bytes) as out:
        tensors_in = iter_tensors(files, own_memory=True)  # a kept tensor (passthrough) pins only its own pages
        for name, tensor in tqdm(tensors_in, total=len(names), desc=f"quantize {qcfg.method}",
                                 unit="tensor", disable=not progress):
            if is_quantized_linear(name, qcfg):
                tensors = quantize_linear(qcfg, name[: -len(".weight")], tensor)
                q_elems += tensor.numel()
                q_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            else:
                tensors = passthrough(name, tensor, qcfg, config, allow_non_finite)
            out.add(tensors)
        shards = out.finish(quantized_config(config, qcfg, src))
    return ConversionReport(
        method=qcfg.method,
        seconds=time.perf_counter() - start,
        bytes_before=sum(f.stat().st_size for f in files),
        bytes_after=sum(f.stat().st_size for f in weight_files(dst)),
        quantized_weights=q_elems,
        quantized_bytes=q_bytes,
        peak_rss_bytes=peak_rss_bytes(),
        shards=shards,
    )

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
import re
import resource
import shutil
import time
from pathlib import Path

import torch

from qwen2q import __version__
from qwen2q.checkpoint import check_model_dir, iter_tensors, save_safetensors, tensor_names, weight_files
from qwen2q.config import Qwen2Config
from qwen2q.errors import Qwen2qError
from qwen2q.qconfig import QuantConfig
from qwen2q.qlinear import quantize_linear

# Files copied next to the weights: tokenizer, chat template, generation settings.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "README.md", "LICENSE")
LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
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


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise Qwen2qError(f"destination {dst} is the source or inside it; choose a directory outside {src}")
    if d in s.parents:
        raise Qwen2qError(f"destination {dst} contains the source {src}; choose another directory")
    if dst.exists() and not dst.is_dir():
        raise Qwen2qError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise Qwen2qError(f"destination {dst} is not empty; pass --force to replace it")


def _remove_stale_partials(dst: Path) -> None:
    """Delete temporary directories that killed conversions into `dst` left behind (their process is gone)."""
    for old in dst.parent.glob(f".{dst.name}.partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
        if not alive:
            shutil.rmtree(old, ignore_errors=True)


def _peak_rss_bytes() -> int:
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
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n


def convert(src, dst, qcfg: QuantConfig, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: bool = True) -> ConversionReport:
    """Quantize checkpoint `src` into the new directory `dst` with `qcfg` (round-to-nearest methods)."""
    from tqdm import tqdm

    src, dst = check_model_dir(src), Path(dst)
    config = Qwen2Config.from_file(src / "config.json")
    if config.quantization_config:
        raise Qwen2qError(f"{src} is already quantized ({config.quantization_config.get('quant_method')}); "
                          "give a bf16/fp16/fp32 checkpoint")
    _check_destination(src, dst, force)
    if config.dtype in ("bfloat16", "float16", "float32"):  # peers compute in the source's dtype
        qcfg = dataclasses.replace(qcfg, compute_dtype=config.dtype)
    files = weight_files(src)
    names = tensor_names(files)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    _remove_stale_partials(dst)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        q_elems = q_bytes = 0
        for name, tensor in tqdm(iter_tensors(files), total=len(names), desc=f"quantize {qcfg.method}",
                                 unit="tensor", disable=not progress):
            module = name[: -len(".weight")]
            if LINEAR_WEIGHT.match(name) and not qcfg.skips(module):
                out = quantize_linear(qcfg, module, tensor)
                q_elems += tensor.numel()
                q_bytes += sum(t.numel() * t.element_size() for t in out.values())
            elif name.endswith(".bias") and LINEAR_WEIGHT.match(name[: -len(".bias")] + ".weight") \
                    and not qcfg.skips(name[: -len(".bias")]) and qcfg.method in ("int4", "awq"):
                out = {name: tensor.to(torch.float16)}  # AutoAWQ's WQLinear_GEMM keeps its bias in fp16
            elif name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            else:
                out = {name: tensor.clone()}
            writer.add(out)
        shards = writer.finish()
        for side in SIDE_FILES:
            if (src / side).is_file():
                shutil.copy2(src / side, tmp / side)
        cfg = config.to_dict()
        cfg["quantization_config"] = qcfg.to_hf()
        cfg["qwen2q"] = {"version": __version__, "method": qcfg.method, "group_size": qcfg.group_size
                         if qcfg.method in ("int4", "awq") else None, "source": src.name}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")  # last: only now does tmp load
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionReport(
        method=qcfg.method,
        seconds=time.perf_counter() - start,
        bytes_before=sum(f.stat().st_size for f in files),
        bytes_after=sum(f.stat().st_size for f in weight_files(dst)),
        quantized_weights=q_elems,
        quantized_bytes=q_bytes,
        peak_rss_bytes=_peak_rss_bytes(),
        shards=shards,
    )

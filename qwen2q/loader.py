"""Build a Qwen2ForCausalLM from a checkpoint directory, and save one back.

The model is created on the meta device (no memory), the quantization format named in config.json
(if any) swaps its linears for quantized modules from outside (`qwen2q.qlinear`), and then the tensors are assigned one by one from the
memory-mapped files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen2q.checkpoint import (
    SINGLE_FILE,
    check_filled,
    check_model_dir,
    fill_module,
    iter_tensors,
    save_safetensors,
    validate_checkpoint,
    weight_files,
)
from qwen2q.config import Qwen2Config
from qwen2q.errors import CheckpointError, Qwen2qError
from qwen2q.model import Qwen2ForCausalLM
from qwen2q.recipe import Recipe
from qwen2q.kernels import CPU_CACHES
from qwen2q.fused import use_fused_ops
from qwen2q.qlinear import prepare_kernels, swap_linears
from qwen2q.rope import RotaryEmbedding

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None, default: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise Qwen2qError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    name = (dtype or default).replace("torch.", "")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)
    if name not in DTYPES:
        raise Qwen2qError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    allow_non_finite: bool = False,
    cpu_cache: str | None = None,
) -> Qwen2ForCausalLM:
    """Load the checkpoint directory `path` onto `device`, casting floating tensors to `dtype`
    (default: the checkpoint's own dtype).

    Before anything is read, every tensor's name, shape and dtype is checked against config.json from
    the file headers; while reading, a NaN/Inf value (stored, or made by the cast) is refused unless
    `allow_non_finite`.  On CPU the quantized linears are then prepared for the CPU backend
    (`qwen2q.qlinear.prepare_kernels`); `cpu_cache="bf16"` keeps a bf16 copy of each instead (bf16 models on
    CPU only).  On CUDA each layer's norms, rotary embeddings, decode attention and activation run fused kernels,
    and an int4 model's q, k, v and gate, up one matmul each (`qwen2q.fused`)."""
    path = check_model_dir(path)
    config = Qwen2Config.from_file(path / "config.json")
    dtype = parse_dtype(dtype, config.dtype)
    device = torch.device(device)
    check_cpu_cache(cpu_cache, device, dtype)
    files = weight_files(path, allow_pickle=allow_pickle)
    validate_checkpoint(path, config, files)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    quantized = []
    if config.quantization_config:
        quantized = swap_linears(model, Recipe.from_hf(config.quantization_config), dtype)
    # Rotary frequencies are computed, never stored in checkpoints.
    model.model.rotary = RotaryEmbedding(config.rope, config.head_dim).to(device)
    ignore = {"lm_head.weight"} if config.tie_word_embeddings else set()
    try:
        fill_module(model, iter_tensors(files), dtype, device, ignore=ignore, allow_non_finite=allow_non_finite)
    except CheckpointError as e:  # name the checkpoint: eval and drift load several
        raise CheckpointError(f"{path}: {e}") from None
    for module in quantized:
        module.finish_loading()
    prepare_kernels(quantized, cpu_cache)
    if config.tie_word_embeddings:
        model.tie_weights()
    check_filled(model)
    if device.type == "cuda":
        use_fused_ops(model)  # a layer's small steps one launch each; int4 projections grouped
    return model.eval()


def check_cpu_cache(cpu_cache: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a `cpu_cache` that is unknown or would be ignored (off CPU, or a model not in bf16)."""
    if cpu_cache is None:
        return
    if cpu_cache not in CPU_CACHES:
        raise Qwen2qError(f"cpu_cache={cpu_cache!r} is not known; use None or one of {', '.join(CPU_CACHES)}")
    if device.type != "cpu":
        raise Qwen2qError(f"cpu_cache={cpu_cache!r} applies to models loaded on CPU, not on {device}")
    if dtype != torch.bfloat16:
        dtype_name = str(dtype).removeprefix("torch.")
        raise Qwen2qError(f"cpu_cache={cpu_cache!r} needs the model in bfloat16, not {dtype_name}")


def save_model(model: Qwen2ForCausalLM, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json and model.safetensors (tied lm_head saved once, as transformers does)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_safetensors(state, path / SINGLE_FILE)
    cfg = model.config.to_dict()
    if dtype is not None:
        cfg["dtype"] = str(dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

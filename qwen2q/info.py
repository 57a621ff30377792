"""What `qwen2q info` reports about a checkpoint directory, read from config.json and file headers only."""
from __future__ import annotations

from pathlib import Path

from qwen2q.checkpoint import check_model_dir, weight_files
from qwen2q.architecture import parameter_count
from qwen2q.config import Qwen2Config
from qwen2q.quantizers import registry
from qwen2q.recipe import MIXED


def quantization_summary(c: Qwen2Config) -> str:
    """The checkpoint's quantization in a phrase, as its format describes it ("none" when unquantized)."""
    q = c.quantization_config
    if not q:
        return "none"
    if q.get("quant_method") == MIXED and isinstance(q.get("groups"), list):
        return "mixed: " + "; ".join(_describe_group(g) for g in q["groups"])
    fmt = registry.for_config(q)
    return fmt.describe(q) if fmt is not None else str(q.get("quant_method"))


def _describe_group(group) -> str:
    config = group.get("config") if isinstance(group, dict) else None
    fmt = registry.for_config(config) if isinstance(config, dict) else None
    phrase = fmt.describe(config) if fmt is not None else str(group.get("format") if isinstance(group, dict) else group)
    modules = group.get("modules") if isinstance(group, dict) else None
    return f"{phrase} ({len(modules)} linears)" if isinstance(modules, list) else phrase


def describe(path: str | Path) -> list[tuple[str, str]]:
    """(field, value) rows describing the checkpoint at `path`."""
    path = check_model_dir(path)
    c = Qwen2Config.from_file(path / "config.json")
    files = weight_files(path, allow_pickle=True)
    size = sum(f.stat().st_size for f in files)
    rope = c.rope.rope_type if c.rope.rope_type == "default" else f"{c.rope.rope_type} x{c.rope.factor:g}"
    return [
        ("path", str(path)),
        ("architecture", "Qwen2ForCausalLM"),
        ("parameters", f"{parameter_count(c) / 1e6:,.1f} M"),
        ("layers", str(c.num_hidden_layers)),
        ("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}"),
        ("heads / kv heads / head dim", f"{c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim}"),
        ("vocab", str(c.vocab_size)),
        ("tied embeddings", "yes" if c.tie_word_embeddings else "no"),
        ("rope", f"{rope}, theta {c.rope.theta:g}"),
        ("context", str(c.max_position_embeddings)),
        ("dtype", c.dtype),
        ("quantization", quantization_summary(c)),
        ("weight files", str(len(files))),
        ("size on disk", f"{size / 2**20:,.1f} MiB"),
    ]

"""Write a random-weight Qwen2 checkpoint with a real model's shapes, for memory and speed proofs.

\b
    python dev random-checkpoint OUT_DIR [--shape qwen2-7b] [--tokenizer-from DIR] [--layers N] [--seed 0]

The weights are N(0, 0.02) in bf16 (norm weights 1, q/k/v biases N(0, 0.1)), written shard by shard
(at most one shard in memory) as sharded safetensors with a model.safetensors.index.json, so the
result looks to qwen2q exactly like a downloaded checkpoint of that size: Qwen2-7B's shapes give
7.6e9 parameters, 15.2 GB.  The tokenizer files are copied from --tokenizer-from (any Qwen2 model:
they share the vocabulary), so `qwen2q quantize --method awq` can tokenize its calibration text.
`--layers N` keeps the first N decoder layers (every tensor keeps its real shape): the same per-layer
peak memory in a fraction of the conversion time, since AWQ holds one decoder layer at a time.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

SHAPES = {
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def config_for(shape: str) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
            "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643, **SHAPES[shape]}


def tensor_shapes(cfg: dict):
    """(name, shape) of every stored tensor, in checkpoint order."""
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    kv_width = kv * h // cfg["num_attention_heads"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv_width, h)), ("v_proj", (kv_width, h))):
            yield p + f"self_attn.{name}.weight", shape
            yield p + f"self_attn.{name}.bias", shape[:1]
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (cfg["vocab_size"], h)


def random_tensor(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 0.1 if name.endswith(".bias") else 0.02
    return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)


def write(out: Path, shape: str, tokenizer_from: Path | None, shard_bytes: int = 4 << 30, seed: int = 0,
          layers: int | None = None) -> int:
    """Write the checkpoint into `out` (the first `layers` decoder layers, default all); return its size in bytes."""
    cfg = config_for(shape)
    if layers is not None:
        if not 0 < layers <= cfg["num_hidden_layers"]:
            raise ValueError(f"layers must be 1..{cfg['num_hidden_layers']} for {shape}, not {layers}")
        cfg.update(num_hidden_layers=layers, max_window_layers=layers)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    n_shards, current, size, total = 0, {}, 0, 0

    def flush():
        nonlocal current, size, n_shards
        if current:
            n_shards += 1
            save_file(current, out / f"part-{n_shards:05d}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0  # drop the written shard: at most one is ever in memory

    names = {}
    for name, dims in tensor_shapes(cfg):
        t = random_tensor(name, dims, g)
        if size and size + t.numel() * 2 > shard_bytes:
            flush()
        current[name] = t
        names[name] = n_shards + 1
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    n = n_shards
    for i in range(1, n + 1):
        (out / f"part-{i:05d}.safetensors").rename(out / f"model-{i:05d}-of-{n:05d}.safetensors")
    weight_map = {name: f"model-{i:05d}-of-{n:05d}.safetensors" for name, i in names.items()}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer_from / f).is_file():
                shutil.copy2(tokenizer_from / f, out / f)
    return total


@click.command("random-checkpoint", help=__doc__)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="qwen2-7b", show_default=True)
@click.option("--tokenizer-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Copy the tokenizer files from this Qwen2 model.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Keep only the first N decoder layers (at their real shapes).")
def command(out, shape, tokenizer_from, seed, layers) -> None:
    try:
        total = write(out, shape, tokenizer_from, seed=seed, layers=layers)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--layers") from None
    depth = f", {layers} layers" if layers else ""
    click.echo(f"wrote {out}: {total / 1e9:.2f} GB of bf16 tensors ({shape} shapes{depth})")


def main(argv: list[str] | None = None) -> int:
    """`python dev random-checkpoint ARGV` in this process (see `qwen2q_dev.cli.main`)."""
    from qwen2q_dev.cli import run_command

    return run_command(command, argv)

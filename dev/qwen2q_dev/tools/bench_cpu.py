"""CPU benchmark: quantized checkpoints on the CPU backend and on the reference path, beside their bf16 source.

\b
    python dev bench-cpu SRC Q [Q ...] [--prompt-len 512] [--new-tokens 32] [--rounds 3] [--json FILE]

SRC is the bf16 checkpoint, each Q a quantized checkpoint of it; every model runs in bf16 on CPU.  Rows:
bf16 (SRC), and for each Q its reference path (`forced_backend`: dequantize every call), the CPU
backend (`qwen2q.kernels.cpu`), and, for NF4 (every format with --cache-all), the CPU backend with
`cpu_cache="bf16"`.  Each round times every row in turn, so the load of a shared machine falls on all alike:

- per layer: one linear of each projection shape (q_proj for q/o, k_proj for k/v, gate_proj for gate/up,
  down_proj), one call at M = 1 and one at M = --prompt-len, cycled through that linear of every decoder
  layer so that the weights stream from memory as they do in decoding;
- end to end: a prefill of --prompt-len random tokens, then --new-tokens greedy decode steps (the static
  decoder of `qwen2q bench`); the reference path decodes --reference-tokens steps (it dequantizes every
  weight each step).

The tables give the median over rounds, and each median over bf16's (x bf16).  `extra MiB` is what the CPU
backend holds besides the checkpoint's tensors: repacked weights and scales, or the bf16 cache.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import click
import torch

from qwen2q.cli_options import json_option
from qwen2q.evals.table import Column, format_table

PROJECTIONS = ("q_proj", "k_proj", "gate_proj", "down_proj")  # one linear of each Qwen2 projection shape


def backend_of(row: dict):
    """The reference rows run their model on the reference path (`forced_backend`); the others as loaded."""
    from qwen2q.qlinear import forced_backend

    return forced_backend(row["model"], "reference") if row["backend"] == "reference" else contextlib.nullcontext()


def extra_bytes(model) -> int:
    """Bytes of the tensors the CPU backend's prepared weights hold that are not the modules' own buffers."""
    import dataclasses

    from qwen2q.qlinear import QuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.prepared is not None:
            own = {t.data_ptr() for t in module.buffers()}
            for field in dataclasses.fields(module.prepared):
                t = getattr(module.prepared, field.name)
                if isinstance(t, torch.Tensor) and t.data_ptr() not in own:
                    total += t.numel() * t.element_size()
    return total


def candidates(src: Path, quantized: list[Path], cache_all: bool) -> list[dict]:
    """The rows: {"label", "backend", "model", ...}, each model loaded once (a cached copy where asked)."""
    import qwen2q
    from qwen2q.evals.harness import method_label

    rows = [{"label": "bf16", "format": "bf16", "backend": "bf16", "model": qwen2q.load(src, dtype="bfloat16").model}]
    for path in quantized:
        m = qwen2q.load(path, dtype="bfloat16").model
        label = method_label(path)
        rows.append({"label": label, "format": label, "backend": "reference", "model": m})
        rows.append({"label": label, "format": label, "backend": "cpu", "model": m})
        if cache_all or label.startswith("nf4"):
            cached = qwen2q.load(path, dtype="bfloat16", cpu_cache="bf16").model
            rows.append({"label": label, "format": label, "backend": "cpu+bf16 cache", "model": cached})
    for row in rows:
        row["extra_mib"] = extra_bytes(row["model"]) / 2**20 if row["backend"] != "reference" else 0.0
    return rows


def layer_linears(model, projection: str) -> list:
    return [getattr(layer.self_attn if projection in ("q_proj", "k_proj") else layer.mlp, projection)
            for layer in model.model.layers]


@torch.inference_mode()
def time_layers(row: dict, prompt_len: int, seed: int) -> dict[str, float]:
    """{"{projection}_m{M}": seconds per call} for M = 1 and prompt_len, each linear of every layer once."""
    out = {}
    for projection in PROJECTIONS:
        linears = layer_linears(row["model"], projection)
        K = linears[0].in_features
        for M in (1, prompt_len):
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
            linears[-1](x)  # warm: workspace buffers, lazy initialisation
            t0 = time.perf_counter()
            for linear in linears:
                linear(x)
            out[f"{projection}_m{M}"] = (time.perf_counter() - t0) / len(linears)
    return out


@torch.inference_mode()
def time_model(row: dict, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Prefill and decode tokens/s of one row (the bench command's static decoder)."""
    from qwen2q.decode import StaticDecoder

    dec = StaticDecoder(row["model"], prompt.shape[1] + new_tokens + 1)
    t0 = time.perf_counter()
    logits = dec.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        token = dec.step(token).argmax(-1, keepdim=True)
    return {"prefill_tok_s": prompt.shape[1] / prefill_s, "decode_tok_s": new_tokens / (time.perf_counter() - t0)}


def run(rows: list[dict], prompt_len: int, new_tokens: int, reference_tokens: int, rounds: int, seed: int,
        progress=None) -> list[dict]:
    """Time every row `rounds` times, interleaved; return one result dict per row (medians and all samples)."""
    vocab = rows[0]["model"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    samples: list[dict[str, list[float]]] = [{} for _ in rows]
    for row in rows:  # warm-up: lazy initialisation and workspace buffers outside the timings
        with backend_of(row):
            time_model(row, prompt[:, :8], 1)
    for r in range(rounds):
        for row, sample in zip(rows, samples):
            steps = reference_tokens if row["backend"] == "reference" else new_tokens
            with backend_of(row):
                figures = {**time_layers(row, prompt_len, seed), **time_model(row, prompt, steps)}
            for key, value in figures.items():
                sample.setdefault(key, []).append(value)
            if progress:
                progress(f"round {r + 1}/{rounds} {row['label']} {row['backend']}: prefill "
                         f"{figures['prefill_tok_s']:.1f} tok/s, decode {figures['decode_tok_s']:.2f} tok/s")
    results = []
    for row, sample in zip(rows, samples):
        medians = {key: statistics.median(values) for key, values in sample.items()}
        results.append({"format": row["format"], "backend": row["backend"], "extra_mib": row["extra_mib"],
                        **medians, "samples": sample})
    base = results[0]
    for res in results:
        for key in ("prefill_tok_s", "decode_tok_s"):
            res[f"{key}_x"] = res[key] / base[key]
        for projection in PROJECTIONS:
            for M in (1, prompt_len):
                key = f"{projection}_m{M}"
                res[f"{key}_x"] = base[key] / res[key]  # speed, not time, relative to bf16
    return results


def end_to_end_table(results: list[dict], prompt_len: int) -> str:
    columns = [Column("format", "format"), Column("backend", "backend"),
               Column("decode tok/s", "decode_tok_s", "{:.2f}"), Column("x bf16", "decode_tok_s_x", "{:.2f}"),
               Column(f"prefill tok/s (M={prompt_len})", "prefill_tok_s", "{:.1f}"),
               Column("x bf16", "prefill_tok_s_x", "{:.2f}"), Column("extra MiB", "extra_mib", "{:.0f}")]
    return format_table(columns, results)


def layer_table(results: list[dict], prompt_len: int, shapes: dict[str, tuple[int, int]]) -> str:
    columns = [Column("linear [N, K]", "linear"), Column("format", "format"), Column("backend", "backend"),
               Column("M=1 us", "m1_us", "{:.0f}"), Column("x bf16", "m1_x", "{:.2f}"),
               Column(f"M={prompt_len} ms", "mp_ms", "{:.2f}"), Column("x bf16", "mp_x", "{:.2f}")]
    rows = []
    for projection in PROJECTIONS:
        N, K = shapes[projection]
        for res in results:
            rows.append({"linear": f"{projection} [{N}, {K}]", "format": res["format"], "backend": res["backend"],
                         "m1_us": res[f"{projection}_m1"] * 1e6, "m1_x": res[f"{projection}_m1_x"],
                         "mp_ms": res[f"{projection}_m{prompt_len}"] * 1e3, "mp_x": res[f"{projection}_m{prompt_len}_x"]})
    return format_table(columns, rows)


@click.command("bench-cpu", help=__doc__)
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("quantized", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--prompt-len", default=512, show_default=True, type=click.IntRange(min=2), help="Prefill tokens (M).")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(min=1), help="Decode steps timed.")
@click.option("--reference-tokens", default=4, show_default=True, type=click.IntRange(min=1),
              help="Decode steps timed on the reference path.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--cache-all", is_flag=True, help="A cpu_cache='bf16' row for every format, not only NF4.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch threads (default: torch's).")
@click.option("--seed", default=0, show_default=True)
@json_option
def command(src, quantized, prompt_len, new_tokens, reference_tokens, rounds, cache_all, threads, seed, json_out):
    if threads:
        torch.set_num_threads(threads)
    rows = candidates(Path(src), [Path(q) for q in quantized], cache_all)
    config = rows[0]["model"].config
    if prompt_len + new_tokens + 1 > config.max_position_embeddings:
        raise click.BadParameter(f"--prompt-len + --new-tokens exceed the model's context of "
                                 f"{config.max_position_embeddings}", param_hint="--prompt-len")
    load_before = os.getloadavg()
    results = run(rows, prompt_len, new_tokens, reference_tokens, rounds, seed,
                  progress=lambda line: click.echo(line, err=True))
    shapes = {p: (layer_linears(rows[0]["model"], p)[0].out_features, layer_linears(rows[0]["model"], p)[0].in_features)
              for p in PROJECTIONS}
    settings = {"src": str(src), "quantized": list(quantized), "prompt_len": prompt_len, "new_tokens": new_tokens,
                "reference_tokens": reference_tokens, "rounds": rounds, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "load_average_before": load_before, "load_average_after": os.getloadavg()}
    click.echo(f"{Path(src).name}: {rounds} rounds interleaved, medians; {settings['threads']} torch threads, "
               f"load average {load_before[0]:.1f} before, {settings['load_average_after'][0]:.1f} after")
    click.echo(end_to_end_table(results, prompt_len))
    click.echo("")
    click.echo(layer_table(results, prompt_len, shapes))
    if json_out:
        Path(json_out).write_text(json.dumps({"settings": settings, "shapes": shapes, "results": results}, indent=2) + "\n")
        click.echo(f"wrote {json_out}")

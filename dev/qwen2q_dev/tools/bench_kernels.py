"""Kernel benchmark: qwen2q's int4, NF4 and int8 dequant-GEMMs against bf16 cuBLAS on Qwen2 shapes.

\b
    python dev bench-kernels                    # GPU: Qwen2-7B and 72B shapes, every M
    python dev bench-kernels --models 7b --m 1,16,2048
    TRITON_INTERPRET=1 python dev bench-kernels --smoke   # CPU: tiny shapes, checks the script

For each (model, projection, M) it first checks every kernel against dequantize + fp32 matmul, then
times it with `triton.testing.do_bench` (median), cycling through enough copies of the weights that no
call finds them in L2.  It prints time, TFLOP/s, effective GB/s (bytes of quantized weights, scales and
activations moved) and speed-up over bf16 (a line per shape on stderr as it goes, the table at the end),
measures the device's copy bandwidth in the same run, and writes JSON to --json (default: under
research/results/, named after the GPU).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import click
import torch

from qwen2q.cli_options import json_option
from qwen2q.evals.table import Column
from qwen2q.evals.table import format_table as render_table

SHAPES = {  # name -> (K, N) of y = x @ W^T with W [N, K]
    "7b": {"qo_proj": (3584, 3584), "kv_proj": (3584, 512), "gate_up_proj": (3584, 18944), "down_proj": (18944, 3584)},
    "72b": {"qo_proj": (8192, 8192), "kv_proj": (8192, 1024), "gate_up_proj": (8192, 29568), "down_proj": (29568, 8192)},
}
SMOKE_SHAPES = {"smoke": {"a": (256, 128), "b": (128, 384)}}
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 256, 2048)
FORMATS = ("int4", "nf4", "int8")
L2_BYTES = 64 * 2**20  # larger than any current GPU's L2 (H100 50 MB, H200 50 MB)
RESULTS = Path(__file__).resolve().parents[1] / "research" / "results"


def quantize(fmt: str, w: torch.Tensor):
    """W [N, K] bf16 (on the device) -> the format's weight object, quantized on the device."""
    from qwen2q.quantizers import int4, int8, nf4

    if fmt == "int4":
        return int4.quantize(w, *int4.compute_scales_zeros(w, 128))
    return {"nf4": nf4, "int8": int8}[fmt].quantize(w)


def stored_tensors(q) -> list[torch.Tensor]:
    return [v for v in vars(q).values() if isinstance(v, torch.Tensor)]


def copies(q, n: int) -> list:
    """`q` and n-1 clones in fresh memory, cycled through so that timing never finds a weight in L2."""
    import dataclasses

    clone = lambda: dataclasses.replace(q, **{k: v.clone() for k, v in vars(q).items()  # noqa: E731
                                              if isinstance(v, torch.Tensor)})
    return [q] + [clone() for _ in range(n - 1)]


def reference(fmt: str, x: torch.Tensor, q) -> torch.Tensor:
    from qwen2q.quantizers import int4, int8, nf4

    mod = {"int4": int4, "nf4": nf4, "int8": int8}[fmt]
    return x.float() @ mod.dequantize(q, torch.float32).t()


_NATIVE: dict[int, object] = {}  # id(qweight) -> the int4 GEMV layout, made once as a loaded model makes it


def _int4_as_loaded(x, q, bias=None, out=None):
    """triton_ops.int4_linear as a model loaded on the GPU calls it: with the GEMV layout `prepare` makes."""
    from qwen2q.kernels import int4_native, triton_ops

    key = id(q.qweight)
    if key not in _NATIVE:
        _NATIVE[key] = int4_native.from_awq(q) if triton_ops.gemv_applies(q) else None
    return triton_ops.int4_linear(x, q, bias, out=out, native=_NATIVE[key])


def kernel(fmt: str):
    from qwen2q.kernels import triton_ops

    return {"int4": _int4_as_loaded, "nf4": triton_ops.nf4_linear, "int8": triton_ops.int8_linear}[fmt]


def timer(device):
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, perf_counter under the interpreter."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu


def copy_bandwidth(device, timed) -> float:
    """Device copy bandwidth in GB/s (read + write) on a 1 GiB buffer (4 MiB on CPU)."""
    n = 2**30 if device.type == "cuda" else 2**22
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


def bench(models, m_values, formats, device, smoke=False) -> dict:
    g = torch.Generator().manual_seed(0)
    timed = timer(device)
    rows, failures = [], []
    shapes = SMOKE_SHAPES if smoke else {k: SHAPES[k] for k in models}
    for model, projections in shapes.items():
        for proj, (K, N) in projections.items():
            # random, never zero: a constant offset keeps every weight (and every scale) away from 0
            dense = (torch.randn(N, K, generator=g) * 0.02 + 1e-3).to(torch.bfloat16).to(device)
            rotate = (lambda nbytes: max(1, math.ceil(L2_BYTES / nbytes))) if device.type == "cuda" else (lambda _: 1)
            dense_copies = [dense] + [dense.clone() for _ in range(rotate(dense.numel() * 2) - 1)]
            quantized = {}
            for fmt in formats:
                q = quantize(fmt, dense)
                nbytes = sum(t.numel() * t.element_size() for t in stored_tensors(q))
                quantized[fmt] = (copies(q, rotate(nbytes)), nbytes)
            for M in m_values:
                x = (torch.randn(M, K, generator=g)).to(torch.bfloat16).to(device)
                state = {"i": 0}

                def bf16():
                    state["i"] += 1
                    return x @ dense_copies[state["i"] % len(dense_copies)].t()

                t_bf16 = timed(bf16)
                flops = 2 * M * N * K
                row = {"model": model, "proj": proj, "K": K, "N": N, "M": M, "bf16_ms": t_bf16,
                       "bf16_tflops": flops / t_bf16 / 1e9}
                for fmt in formats:
                    qs, nbytes = quantized[fmt]
                    run = kernel(fmt)
                    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=device)
                    run(x, qs[0], None, out=y)
                    ref = reference(fmt, x, qs[0])
                    rel = ((y.float() - ref).norm() / ref.norm()).item()
                    if not rel < 1e-2:
                        failures.append(f"{model} {proj} M={M} {fmt}: relative error {rel:.3g}")

                    def fn(run=run, qs=qs):
                        state["i"] += 1
                        return run(x, qs[state["i"] % len(qs)])

                    ms = timed(fn)
                    moved = nbytes + 2 * M * K + 2 * M * N
                    row.update({f"{fmt}_ms": ms, f"{fmt}_tflops": flops / ms / 1e9, f"{fmt}_gbs": moved / ms / 1e6,
                                f"{fmt}_speedup": t_bf16 / ms, f"{fmt}_rel_err": rel})
                rows.append(row)
                click.echo(format_row(row, formats), err=True)
    return {"rows": rows, "failures": failures}


def format_row(row: dict, formats) -> str:
    cells = [f"{row['model']:<5} {row['proj']:<13} M={row['M']:<5} bf16 {row['bf16_ms'] * 1e3:8.1f} us"]
    for fmt in formats:
        cells.append(f"{fmt} {row[f'{fmt}_ms'] * 1e3:8.1f} us {row[f'{fmt}_gbs']:7.0f} GB/s "
                     f"{row[f'{fmt}_tflops']:6.1f} TF x{row[f'{fmt}_speedup']:.2f}")
    return " | ".join(cells)


def format_table(rows: list[dict], formats) -> str:
    """Every (model, projection, M) with bf16's time and each format's time, GB/s, TFLOP/s and speed-up."""
    columns = [Column("model", "model"), Column("proj", "proj"), Column("M", "M"), Column("bf16 us", "bf16_us", "{:.1f}")]
    for fmt in formats:
        columns += [Column(f"{fmt} us", f"{fmt}_us", "{:.1f}"), Column("GB/s", f"{fmt}_gbs", "{:.0f}"),
                    Column("TF", f"{fmt}_tflops", "{:.1f}"), Column("x bf16", f"{fmt}_speedup", "{:.2f}")]
    shown = [{**row, **{f"{k[:-3]}_us": v * 1e3 for k, v in row.items() if k.endswith("_ms")}} for row in rows]
    return render_table(columns, shown)


@click.command("bench-kernels", help=__doc__)
@click.option("--models", default="7b,72b", show_default=True, help="Comma list of: 7b, 72b.")
@click.option("--m", "m_list", default=",".join(map(str, M_VALUES)), show_default=True, help="Comma list of M values.")
@click.option("--formats", default=",".join(FORMATS), show_default=True)
@click.option("--smoke", is_flag=True, help="Tiny shapes; runs on CPU under TRITON_INTERPRET=1.")
@json_option
def command(models, m_list, formats, smoke, json_out) -> int:
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif smoke and os.environ.get("TRITON_INTERPRET") == "1":
        device = torch.device("cpu")
    else:
        raise click.UsageError("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 to check the script on CPU)")
    formats = tuple(formats.split(","))
    m_values = tuple(int(m) for m in m_list.split(",")) if not smoke else (1, 3, 16, 33)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu-interpreter"
    timed = timer(device)
    bandwidth = copy_bandwidth(device, timed)
    click.echo(f"{gpu}: copy bandwidth {bandwidth:.0f} GB/s")
    result = bench(models.split(","), m_values, formats, device, smoke=smoke)
    for row in result["rows"]:
        for fmt in formats:
            row[f"{fmt}_bandwidth_fraction"] = row[f"{fmt}_gbs"] / bandwidth
    result.update({"gpu": gpu, "copy_bandwidth_gbs": bandwidth, "torch": torch.__version__})
    click.echo(format_table(result["rows"], formats))
    out = Path(json_out or RESULTS / f"bench_kernels_{gpu.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"wrote {out}")
    for f in result["failures"]:
        click.echo(f"FAILED {f}")
    return 1 if result["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    """`python dev bench-kernels ARGV` in this process (see `qwen2q_dev.cli.main`)."""
    from qwen2q_dev.cli import run_command

    return run_command(command, argv)

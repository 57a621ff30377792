"""What the quantized matmul kernels compile to, per format, Qwen2 projection and M, without a GPU.

    python -m qwen2q.kernels.report --arch 90 [--shapes 0.5b|7b|72b|all] [--m 1,16,2048] [--json OUT.json]

Each row builds the launch the runtime makes for y = x @ W^T + b (x bf16 [M, K], W [N, K] in the format,
meta tensors): the same path choice (`tiling.is_decode`), wrapper, tile config and arguments, compiled by
`offline_compile` through Triton's own binder, so a launch on an sm_ARCH GPU finds the same binary
(`kernel_hash`).  Shapes come from `qwen2q.architecture.linear_shapes`; projections of one shape and bias
share a row (q/k/v are separate linears at run time, as are gate/up).  int4 is AWQ GEMM with group 128.

Fields read from the binary (resources from cuobjdump, SASS from nvdisasm, load attribution from the PTX):
    regs               registers per thread;  spill_bytes: stack + local memory per thread (ptxas spills)
    smem_bytes         dynamic shared memory Triton requests
    weight_load_bits   the narrowest ld.global / cp.async whose address derives from the packed-weight
                       argument (`ptx`), checked to exist at that width in the SASS; 128 means every
                       weight load is 128-bit
    inner_loop_sass    SASS instructions, per thread, from the head to the backward branch of the innermost
                       loop holding the weight loads (as many loads of their width as the PTX K loop has): the
                       K loop (a static count, forward branches included)
    sass_per_weight    inner_loop_sass / (BLOCK_K * BLOCK_N / threads), the weights a thread dequantizes
                       per iteration
    loop_loads         global loads per thread per iteration of the PTX loop, by pointer argument: {bits: n}
    loop_shared        shuffle and shared-memory wavefronts per warp per iteration of that loop (t_shared)
    kernel_hash        Triton's cache key of the binary: rows with one hash share one binary
    path               M > 16: "dequantize+cublas" where `tiling.dequantize_first` sends the call to dequantize-once
                       and cuBLAS (the row still describes the fused GEMM it predicts slower), else "fused"
    ctas, waves        grid size; ctas / (132 SMs x resident CTAs per SM), residency limited by registers
                       (65,536 per SM, 256 per warp granule), shared memory (228 KiB per SM, 1 KiB reserved
                       per CTA), 2,048 threads and 32 CTAs per SM

The model behind predicted_fraction_of_bandwidth (H200: 132 SMs, copy bandwidth B = 4.3 TB/s measured,
load latency L = 700 ns, /work/shared/KERNELS.md; clock f = 1.755 GHz, the clock at which the notes' H100
figure of 26 int4 weights per clock per SM at 3.0 TB/s holds).  The kernel's compulsory bytes D = packed
weights + scales + x + what it writes (fp32 partials on the decode path, y on the GEMM path); then

    t_memory  = D / B
    t_issue   = warp instructions / (SMs with work x 4 schedulers x 1 instruction/clock x f), where warp
                instructions = output tiles x K tiles x inner_loop_sass x warps per CTA (loop only)
    t_latency = bytes loaded / (bytes in flight / L)  (Little's law), bytes in flight = resident CTAs x
                bytes one CTA-iteration loads (weight tile + x tile) x iterations in flight (num_stages - 1
                when weights come by async copy, else 1)
    t_tensor  = 2 M N K / 989 TFLOP/s (dense bf16 tensor cores), for tl.dot paths (BLOCK_M >= 16)
    t_shared  = warp shuffle and shared-memory wavefronts / (SMs with work x 1 per clock x f): an SM retires
                32 shuffle results, or 128 bytes of shared memory, per clock (CUDA guide, cc 9.0), counted from
                the loop's SHFL (1 each) and LDS/STS (bits / 32 each, at least 1) x output tiles x K tiles x warps

predicted_fraction_of_bandwidth = t_memory / max(all five); `bound` names the largest.  It ignores the
prologue, the epilogue, the split-K reduce kernel, L2 hits and tail waves: an upper bound to compare
kernels with, not a measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from qwen2q.architecture import linear_shapes
from qwen2q.config import Qwen2Config
from qwen2q.kernels import ptx, sass
from qwen2q.kernels.launch import Launch
from qwen2q.quantizers import int4, int8, nf4

SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.755e9
BANDWIDTH, LATENCY_S, TENSOR_FLOPS = 4.3e12, 700e-9, 989e12
REGS_PER_SM, SMEM_PER_SM, SMEM_RESERVED, THREADS_PER_SM, CTAS_PER_SM = 65536, 228 * 1024, 1024, 2048, 32
INT4_GROUP_SIZE = 128
ACTIVATION = torch.bfloat16  # x, bias and y, as the runtime's default model dtype

# Qwen2 sizes: hidden, intermediate, attention heads, kv heads (head_dim = hidden / heads), layers.
FORMATS = ("int4", "nf4", "int8")
MODELS = {"0.5b": (896, 4864, 14, 2, 24), "7b": (3584, 18944, 28, 4, 28), "72b": (8192, 29568, 64, 8, 80)}


@dataclasses.dataclass(frozen=True)
class Format:
    """decode / gemm: the runtime's launch builders; weight_argument: the kernel parameter holding packed
    weight bytes; meta_weight(N, K): a weight object of W [N, K] on the meta device."""

    decode: Callable[..., Launch]
    gemm: Callable[..., Launch]
    weight_argument: str
    meta_weight: Callable[[int, int], object]
    gemv: Callable[..., Launch] | None = None  # the M = 1 kernel on the load-time layout, where there is one
    gemv_weight: Callable[[int, int], object] | None = None
    gemv_weight_argument: str = ""
    native_decode: Callable[..., Launch] | None = None  # M > 1 on the same load-time layout, where there is one,
    native_decode_applies: Callable[[int], bool] = lambda M: False  # for these M


def _empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _formats() -> dict[str, Format]:
    from qwen2q.kernels import int4_decode, int4_gemm, int4_native, int8_gemm, nf4_gemm

    g = INT4_GROUP_SIZE
    nf4_blocks = lambda N, K: N * K // nf4.BLOCK_SIZE  # noqa: E731
    nf4_weight = lambda N, K: nf4.NF4Weight(  # noqa: E731
        _empty(N * K // 2, 1, dtype=torch.uint8), _empty(nf4_blocks(N, K), dtype=torch.uint8),
        _empty(-(-nf4_blocks(N, K) // nf4.NESTED_BLOCK_SIZE), dtype=torch.float32), 0.0, (N, K), torch.bfloat16)
    int8_weight = lambda N, K: int8.Int8Weight(  # noqa: E731
        _empty(N, K, dtype=torch.int8), _empty(N, dtype=torch.float32))
    return {
        "int4": Format(int4_gemm.int4_decode_launch, int4_gemm.int4_gemm_launch, "W0",
                       lambda N, K: int4.Int4Weight(_empty(K, N // 8, dtype=torch.int32),
                                                    _empty(K // g, N // 8, dtype=torch.int32),
                                                    _empty(K // g, N, dtype=torch.float16)),
                       int4_gemm.int4_gemv_launch,
                       lambda N, K: int4_native.Int4Native(_empty(N, K // 8, dtype=torch.int32),
                                                           _empty(K // g, N, dtype=torch.uint8),
                                                           _empty(K // g, N, dtype=torch.float16)),
                       "words_ptr", int4_decode.int4_native_decode_launch, int4_decode.applies),
        "nf4": Format(nf4_gemm.nf4_decode_launch, nf4_gemm.nf4_gemm_launch, "W0", nf4_weight,
                      nf4_gemm.nf4_gemv_launch, nf4_weight, "words_ptr"),
        "int8": Format(int8_gemm.int8_decode_launch, int8_gemm.int8_gemm_launch, "W0",
                       int8_weight, int8_gemm.int8_gemv_launch, int8_weight, "words_ptr"),
    }


def projections(model: str) -> dict[tuple[int, int, bool], str]:
    """{(N, K, has_bias): "q_proj" or "gate_proj/up_proj" ...} of one decoder layer of a Qwen2 size."""
    hidden, inter, heads, kv_heads, layers = MODELS[model]
    config = Qwen2Config(vocab_size=152064, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads)
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for name, shape in linear_shapes(config).items():
        groups.setdefault(shape, []).append(name.rpartition(".")[2])
    return {shape: "/".join(names) for shape, names in groups.items()}


def runtime_launch(fmt: Format, M: int, N: int, K: int, has_bias: bool) -> tuple[Launch, object, str]:
    """(the launch `triton_ops` makes for x bf16 [M, K] and W [N, K] in a model loaded on the GPU, the weight object
    it reads, the kernel argument holding packed weights), on meta tensors."""
    from qwen2q.kernels import tiling

    x, out = _empty(M, K, dtype=ACTIVATION), _empty(M, N, dtype=ACTIVATION)
    bias = _empty(N, dtype=ACTIVATION) if has_bias else None
    if M == 1 and fmt.gemv is not None:
        w = fmt.gemv_weight(N, K)
        return fmt.gemv(x, w, bias, out), w, fmt.gemv_weight_argument
    if fmt.native_decode is not None and fmt.native_decode_applies(M):
        w = fmt.gemv_weight(N, K)
        return fmt.native_decode(x, w, bias, out), w, fmt.gemv_weight_argument
    w = fmt.meta_weight(N, K)
    return (fmt.decode if tiling.is_decode(M) else fmt.gemm)(x, w, bias, out), w, fmt.weight_argument


def large_m_path(fmt_name: str, M: int, N: int, K: int) -> str:
    """What the runtime runs for M > 16: "fused" (the GEMM row's kernel) or "dequantize+cublas" (W dequantized
    once, then cuBLAS; `tiling.dequantize_first`, or for int4 on the GEMV's layout every M past
    `int4_decode.MAX_M`: `int4_prefill`), in which case the row's kernel is the fused GEMM it replaces."""
    from qwen2q.kernels import int4_decode, int4_gemm, int4_native, int8_gemm, nf4_gemm, tiling

    if fmt_name == "int4" and M > int4_decode.MAX_M and int4_native.supports(K, INT4_GROUP_SIZE) and N % 64 == 0:
        return "dequantize+cublas"
    module = {"int4": int4_gemm, "nf4": nf4_gemm, "int8": int8_gemm}[fmt_name]
    if tiling.is_decode(M) or not tiling.dequantize_first(M, N, K, module.GEMM_SASS_PER_WEIGHT,
                                                          module.PACKED_BYTES_PER_WEIGHT):
        return "fused"
    return "dequantize+cublas"


def ctas_per_sm(regs: int, smem: int, threads: int) -> int:
    """CTAs of `threads` threads, `regs` registers each and `smem` bytes of shared memory one SM holds."""
    warps = -(-threads // 32)
    by_regs = REGS_PER_SM // (warps * -(-regs * 32 // 256) * 256)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED)
    return max(0, min(CTAS_PER_SM, THREADS_PER_SM // threads, by_regs, by_smem))


def analyse(launch: Launch, compiled, weight_argument: str) -> dict:
    """The binary's fields of a row (see the module docstring)."""
    name, cubin = launch.kernel.fn.__name__, compiled.asm["cubin"]
    usage = sass.resource_usage(cubin)
    signature = compiled.src.signature
    weight_loads = [ld for ld in ptx.global_loads(compiled.asm["ptx"], signature) if ld.argument == weight_argument]
    if not weight_loads:
        raise RuntimeError(f"{name}: no global load in the PTX reads through {weight_argument}")
    weight_bits = min(ld.bits for ld in weight_loads)
    instructions, labels = sass.disassemble(cubin)
    load_at = [i for i, ins in enumerate(instructions) if sass.load_bits(ins.opcode) is not None]
    if weight_bits not in {sass.load_bits(instructions[i].opcode) for i in load_at}:
        raise RuntimeError(f"{name}: the PTX loads weights {weight_bits} bits wide, but no SASS load is that wide")
    per_iteration = ptx.loads_per_iteration(compiled.asm["ptx"], signature, weight_argument)
    # The K loop: the innermost SASS loop with as many loads of the weights' width as the PTX loop reads weights
    # per iteration (a kernel may have other loops with loads, such as one summing x).
    weight_loads_per_iteration = per_iteration.get(weight_argument, {}).get(weight_bits, 1)
    holding = [loop for loop in sass.loops(instructions, labels)
               if sum(i in loop and sass.load_bits(instructions[i].opcode) == weight_bits
                      for i in load_at) >= weight_loads_per_iteration]
    if not holding and any(sass.load_bits(instructions[i].opcode) == weight_bits for i in load_at):
        # One K block per program (SPLIT_K as large as the blocks): the compiler may turn the K loop into straight
        # code, which then runs once per program: count all of it.
        holding = [range(len(instructions))]
    if not holding:
        raise RuntimeError(f"{name}: no loop in the SASS holds the weight loads")
    loop = min(holding, key=len)
    c, threads = launch.config, 32 * launch.kwargs["num_warps"]
    return {
        "regs": usage["REG"], "spill_bytes": usage["STACK"] + usage["LOCAL"], "smem_bytes": compiled.metadata.shared,
        "weight_load_bits": weight_bits, "weight_loads_async": any(ld.is_async for ld in weight_loads),
        "inner_loop_sass": len(loop),
        "sass_per_weight": round(len(loop) / (c.BLOCK_K * c.BLOCK_N / threads), 2),
        "loop_loads": {arg: {str(b): n for b, n in sorted(bits.items())} for arg, bits in per_iteration.items()},
        "loop_shared": sum(sass.shared_wavefronts(instructions[i].opcode) for i in loop),
        "kernel_hash": compiled.hash[:16],
    }


def predict(M: int, N: int, K: int, launch: Launch, weight_bytes: int, binary: dict) -> dict:
    """ctas, waves and the bandwidth model's fields of a row (see the module docstring); weight_bytes: the
    packed weights, scales and zeros of W [N, K]."""
    c, warps = launch.config, launch.kwargs["num_warps"]
    ctas = math.prod(launch.grid)
    per_sm = ctas_per_sm(binary["regs"], binary["smem_bytes"], 32 * warps)
    if per_sm == 0:
        return {"ctas": ctas, "ctas_per_sm": 0, "waves": None, "bytes_in_flight_per_sm": None, "predicted_us": None,
                "predicted_fraction_of_bandwidth": None, "bound": "cannot launch"}
    iterations = -(-M // c.BLOCK_M) * -(-N // c.BLOCK_N) * -(-K // c.BLOCK_K)  # output tiles x K tiles
    moved = weight_bytes + M * K * ACTIVATION.itemsize + launch.out.numel() * launch.out.element_size()
    tile_bytes = weight_bytes * c.BLOCK_N * c.BLOCK_K / (N * K) + min(M, c.BLOCK_M) * c.BLOCK_K * ACTIVATION.itemsize
    stages = launch.kwargs["num_stages"] - 1 if binary["weight_loads_async"] else 1
    busy_sms = min(SMS, ctas)
    in_flight = min(ctas, SMS * per_sm) * tile_bytes * max(1, stages)
    times = {
        "memory": moved / BANDWIDTH,
        "issue": iterations * binary["inner_loop_sass"] * warps / (busy_sms * SCHEDULERS * CLOCK_HZ),
        "latency": iterations * tile_bytes * LATENCY_S / in_flight,
        "tensor": 2 * M * N * K / TENSOR_FLOPS if c.BLOCK_M >= 16 else 0.0,
        "shared": iterations * binary["loop_shared"] * warps / (busy_sms * CLOCK_HZ),
    }
    bound = max(times, key=times.get)
    return {"ctas": ctas, "ctas_per_sm": per_sm, "waves": float(f"{ctas / (SMS * per_sm):.3g}"),
            "bytes_in_flight_per_sm": round(in_flight / busy_sms), "predicted_us": round(times[bound] * 1e6, 2),
            "predicted_fraction_of_bandwidth": round(times["memory"] / times[bound], 3), "bound": bound}


def ptxas_version(arch: int) -> str | None:
    """The release of the ptxas Triton runs for sm_`arch` (3.9: its CUDA 13 one from sm_90 up), if it says."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).version
    except (ImportError, AttributeError, TypeError):  # a private helper: other Triton versions may lack it
        return None


def report_rows(arch: int, models: list[str], ms: list[int], formats: list[str]) -> list[dict]:
    """One row per (format, distinct projection shape, M): shape, config, binary fields and prediction."""
    import triton

    from qwen2q.kernels.offline_compile import compile_launch

    from qwen2q.kernels import tiling

    all_formats, rows, ptxas = _formats(), [], ptxas_version(arch)
    tiling.offline_arch = arch  # the tile choice the runtime makes on that architecture (shared memory)
    for fmt_name in formats:
        fmt = all_formats[fmt_name]
        for model in models:
            for (N, K, has_bias), names in projections(model).items():
                for M in ms:
                    launch, w, weight_argument = runtime_launch(fmt, M, N, K, has_bias)
                    binary = analyse(launch, compile_launch(launch, arch), weight_argument)
                    weight_bytes = sum(t.nbytes for t in vars(w).values() if isinstance(t, torch.Tensor))
                    c = launch.config
                    rows.append({"format": fmt_name, "model": model, "projection": names,
                                 "kernel": launch.kernel.fn.__name__, "path": large_m_path(fmt_name, M, N, K),
                                 "M": M, "K": K, "N": N, "bias": has_bias,
                                 "triton": triton.__version__, "ptxas": ptxas, "arch": arch,
                                 "config": {**dataclasses.asdict(c), "num_warps": launch.kwargs["num_warps"],
                                            "num_stages": launch.kwargs["num_stages"]},
                                 **binary, **predict(M, N, K, launch, weight_bytes, binary)})
    return rows


COLUMNS = (("format", "format"), ("projection", "projection"), ("kernel", "kernel"), ("path", "path"), ("M", "M"),
           ("K", "K"),
           ("N", "N"), ("regs", "regs"), ("spill_bytes", "spill"), ("smem_bytes", "smem"),
           ("weight_load_bits", "w-load bits"), ("inner_loop_sass", "loop SASS"), ("sass_per_weight", "SASS/w"),
           ("ctas", "CTAs"), ("waves", "waves"), ("predicted_fraction_of_bandwidth", "pred. BW"), ("bound", "bound"))


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table, one line per row."""
    cells = [[title for _, title in COLUMNS]] + [[str(row[key]) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) if i < 4 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
                     for line in cells)


def model_constants() -> dict:
    return {"sms": SMS, "schedulers_per_sm": SCHEDULERS, "clock_hz": CLOCK_HZ, "bandwidth_bytes_per_s": BANDWIDTH,
            "latency_s": LATENCY_S, "tensor_flops": TENSOR_FLOPS, "int4_group_size": INT4_GROUP_SIZE,
            "activations": str(ACTIVATION).removeprefix("torch.")}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,16,2048") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every M must be at least 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen2q.kernels.report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90, Hopper)")
    parser.add_argument("--shapes", choices=(*MODELS, "all"), default="7b", help="Qwen2 size (default 7b)")
    parser.add_argument("--m", type=_ints, default=[1, 16, 2048], help="rows of x, comma-separated (default 1,16,2048)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    parser.add_argument("--json", type=Path, help="write {meta, rows} to this file")
    args = parser.parse_args(argv)
    formats = args.formats.split(",")
    if unknown := [f for f in formats if f not in FORMATS]:
        parser.error(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
    models = list(MODELS) if args.shapes == "all" else [args.shapes]
    try:
        rows = report_rows(args.arch, models, args.m, formats)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(rows))
    if args.json:
        import triton

        meta = {"triton": triton.__version__, "ptxas": ptxas_version(args.arch), "arch": args.arch,
                "model": model_constants(),
                "command": " ".join(["python -m qwen2q.kernels.report", *(argv if argv is not None else sys.argv[1:])])}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

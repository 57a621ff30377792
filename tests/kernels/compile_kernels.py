"""Compile every kernel for one CUDA architecture with Triton's bundled LLVM and ptxas; no GPU needed.

Run in a process without TRITON_INTERPRET (test_compile.py does): `python compile_kernels.py 90`.
Each kernel is compiled as the runtime launches it (`kernels.offline_compile`: the same launch builders, tile
choice and argument specialisation), on meta tensors of the Qwen2-0.5B gate/up shape, for bf16 and fp16
activations: every format's GEMV (M = 1), split-K decode (M = 16) and GEMM (M = 128) kernel, int4's kernel on the
GEMV's layout (M = 16 and 64) and its dequantize (more than 512 rows), int4's GEMV and decode kernels also with
their split finished in the kernel (`splitk.FIXUP`), the fused layer steps (`layer_ops`) and the static path's attention
(`decode_attention`) at 7B decode shapes, and the split-K reduction (`python -m qwen2q.kernels.report`
reads the same binaries instruction by instruction).  Prints one line per kernel: shared memory, layout
conversions in the TTGIR and local-memory loads in the PTX (register spills), the first things to look at when
tuning.
"""
from __future__ import annotations

import os
import sys

import torch

N, K = 4864, 896  # Qwen2-0.5B gate/up projection


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def launches(act: torch.dtype):
    """(label, Launch) for every kernel and path."""
    from qwen2q.kernels import decode_attention, int4_prefill, layer_ops, splitk, tiling
    from qwen2q.kernels.launch import Launch
    from qwen2q.kernels.report import _formats

    formats = _formats()
    for fmt in ("int4", "nf4", "int8"):
        f = formats[fmt]
        w = f.meta_weight(N, K)
        bias = _meta(N, dtype=act)
        x1, out1 = _meta(1, K, dtype=act), _meta(1, N, dtype=act)
        yield f"{fmt} gemv M=1", f.gemv(x1, f.gemv_weight(N, K), bias, out1)
        x, out = _meta(16, K, dtype=act), _meta(16, N, dtype=act)
        yield f"{fmt} decode M=16", f.decode(x, w, bias, out)
        if fmt == "int4":  # the split-K finished in the kernel (`splitk.FIXUP`): atomics, .cg loads
            splitk.FIXUP = True
            try:
                yield f"{fmt} gemv fixup", f.gemv(x1, f.gemv_weight(N, K), bias, out1)
                yield f"{fmt} decode fixup", f.decode(x, w, bias, out)
                yield f"{fmt} native fixup", f.native_decode(x, f.gemv_weight(N, K), bias, out)
            finally:
                splitk.FIXUP = False
        if f.native_decode is not None:  # int4 M = 2..512 on the GEMV's layout: mma.sync at 16 rows, wgmma at 64
            for m in (16, 64):
                x, out = _meta(m, K, dtype=act), _meta(m, N, dtype=act)
                yield f"{fmt} native M={m}", f.native_decode(x, f.gemv_weight(N, K), bias, out)
            yield f"{fmt} native dequant", int4_prefill.dequantize_launch(f.gemv_weight(N, K), _meta(N, K, dtype=act))
        x, out = _meta(128, K, dtype=act), _meta(128, N, dtype=act)
        yield f"{fmt} gemm M=128", f.gemm(x, w, bias, out)
    # the fused layer steps at the 7B decode shapes (hidden 3584, 28 + 4 heads of 128, intermediate 18944)
    h, m = _meta(1, 3584, dtype=act), _meta(1, 18944, dtype=act)
    yield "rms_norm", layer_ops.rms_norm_launch(h, _meta(3584, dtype=act), 1e-6, h)
    yield "add+rms_norm", layer_ops.rms_norm_launch(h, _meta(3584, dtype=act), 1e-6, h, h, h)
    q, k, cs = _meta(1, 28, 1, 128, dtype=act), _meta(1, 4, 1, 128, dtype=act), _meta(1, 1, 128, dtype=act)
    yield "rotary q,k", layer_ops.rotary_qk_launch(q, k, cs, cs, q, k)
    cache, positions = _meta(1, 4, 4096, 128, dtype=act), _meta(1, dtype=torch.int64)
    yield "rotary+kv cache", layer_ops.rotary_qk_launch(q, k, cs, cs, q, cache, k, cache, positions)
    yield "silu*mul", layer_ops.silu_mul_launch(m, m, m)
    for S, label in ((512, "attention"), (4096, "attention split")):  # one split; 8 and their combine
        cache = _meta(1, 4, S, 128, dtype=act)
        launches = decode_attention.decode_attention_launches(_meta(1, 28, 1, 128, dtype=act), cache, cache,
                                                              positions, _meta(1, 28, 1, 128, dtype=act), None)
        yield label, launches[0]
    yield "attention combine", launches[1]
    partials, out = _meta(4, 16, N, dtype=torch.float32), _meta(16, N, dtype=act)
    yield "split-K reduce", Launch(splitk.splitk_reduce_kernel, (1, 1),
                                   (partials, None, out, 16, N, 4, *partials.stride(), *out.stride()),
                                   dict(HAS_BIAS=False, BLOCK_M=splitk._BLOCK_M, BLOCK_N=splitk._BLOCK_N, num_warps=4,
                                        num_stages=2), tiling.Config(16, 256, 16), out)


def main(arch: int) -> None:
    from qwen2q.kernels import tiling
    from qwen2q.kernels.offline_compile import compile_launch

    if tiling.interpreting():
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    for act, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for label, launch in launches(act):
            compiled = compile_launch(launch, arch)
            print(f"sm_{arch} {name} {label:16s} shared={compiled.metadata.shared:6d}"
                  f" convert_layout={compiled.asm['ttgir'].count('convert_layout'):2d}"
                  f" ld.local={compiled.asm['ptx'].count('ld.local')}")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)

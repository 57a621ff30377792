"""Compile every kernel for one CUDA architecture with Triton's bundled LLVM and ptxas; no GPU needed.

Run in a process without TRITON_INTERPRET (test_compile.py does): `python compile_kernels.py 90`.
Each kernel is compiled with the block config `tiling` picks on a GPU for a decode or a GEMM shape.
Prints one line per kernel: shared memory, layout conversions in the TTGIR and local-memory loads in the
PTX (register spills), the first things to look at when tuning.
"""
from __future__ import annotations

import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qwen2q.kernels import int4_gemm, int8_gemm, nf4_gemm, splitk, tiling

N, K = 4864, 896  # Qwen2-0.5B gate/up projection
WEIGHT_POINTERS = {
    "int4": {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16"},
    "nf4": {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_ptr": "*fp32", "levels_ptr": "*fp32",
            "code_map_ptr": "*fp32"},
    "int8": {"qweight_ptr": "*i8", "absmax_ptr": "*fp32"},
}


def signature(fn, act: str, weights: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Argument types by naming convention: activations/bias/out in `act`, partials fp32, sizes and
    strides i32, the NF4 offset fp32."""
    types = {"x_ptr": f"*{act}", "bias_ptr": f"*{act}", "out_ptr": f"*{act}", "partial_ptr": "*fp32",
             "offset": "fp32", **weights}
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}


def compile_kernel(target, fn, act, weights, constexprs, config):
    source = ASTSource(fn=fn, signature=signature(fn, act, weights, constexprs),
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=target, options=options)


def kernels(act: str):
    """(label, kernel, weight pointer types, constexprs, config) for every kernel and path."""
    dot = {"bf16": tl.bfloat16, "fp16": tl.float16}[act]
    formats = (("int4", int4_gemm, 128, {"GROUP_SIZE": 128}), ("nf4", nf4_gemm, 64, {}), ("int8", int8_gemm, 16, {}))
    for fmt, module, k_multiple, extra in formats:
        for M in (1, 16):
            c = tiling.decode_config(M, N, K, k_multiple, interpret=False)
            meta = {**extra, "DOT_DTYPE": dot, "BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K}
            yield f"{fmt} decode M={M}", getattr(module, f"{fmt}_decode_kernel"), WEIGHT_POINTERS[fmt], meta, c
        c = tiling.gemm_config(128, N, K, k_multiple, interpret=False)
        meta = {**extra, "HAS_BIAS": True, "DOT_DTYPE": dot, "BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N,
                "BLOCK_K": c.BLOCK_K, "GROUP_M": c.GROUP_M}
        yield f"{fmt} gemm M=128", getattr(module, f"{fmt}_gemm_kernel"), WEIGHT_POINTERS[fmt], meta, c
    meta = {"HAS_BIAS": True, "BLOCK_M": splitk._BLOCK_M, "BLOCK_N": splitk._BLOCK_N}
    yield "split-K reduce", splitk.splitk_reduce_kernel, {}, meta, tiling.Config(16, 256, 16)


def main(arch: int) -> None:
    if tiling.interpreting():
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    target = GPUTarget("cuda", arch, 32)
    for act in ("bf16", "fp16"):
        for label, fn, weights, meta, config in kernels(act):
            compiled = compile_kernel(target, fn, act, weights, meta, config)
            print(f"sm_{arch} {act} {label:16s} shared={compiled.metadata.shared:6d}"
                  f" convert_layout={compiled.asm['ttgir'].count('convert_layout'):2d}"
                  f" ld.local={compiled.asm['ptx'].count('ld.local')}")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)

"""int4 for 2..512 rows of x (`MAX_M`): tensor cores on the GEMV's native layout (`int4_native`), y = x @ W^T + bias.

The split-K decode kernel (`skeletons.decode_kernel` with `int4_gemm.int4_tile`) reads AWQ's layout, turns
every weight into fp32 with a shift, a mask, an int-to-float conversion, a subtraction and a multiply, and
sends the tile through shared memory into `tl.dot`: ~10 SASS instructions per weight on sm_90, issue-bound at
~0.37 of the copy bandwidth (kernels/NOTES.md).  This kernel reads the layout the M = 1 GEMV already reads
and computes W x^T (W the left operand, a tile of up to 64 rows of x the right one), so the dequantized
weights are the MMA's A fragments and stay in registers.

Per 128-index block, code j of a row's 16 words covers k = 128 b + 16 j + c (c = 0..15): eight K = 16 dots of
(q - zero) [BLOCK_N, 16] with x^T [16, BLOCK_M], one scale group at a time into `part`; then acc += scale * part
(fp32, per row and group).  An MMA register holds two 16-bit values of one row and adjacent k, i.e. the same code
of two adjacent words, and one inline-assembly block per group makes them (`group_asm`), for two words w0, w1:

    a, b   = rotr(w0, 11), rotr(w1, 11)          natural nibble order: code j at bits 4j
    lo, hi = prmt(a, b): low halves, high halves  codes 0-3 of both words in lo, 4-7 in hi, 16 bits apart
    t      = (lo >> 4s) & 0x000F000F | MAGIC2      two 16-bit floats MAGIC + q (bf16 128 + q; fp16 1024 + q)
    pair   = t * 1 + (-(MAGIC + zero), x2)         q - zero, exact: one fma.rn.bf16x2 (ptxas: HADD2)

so 16 weights cost 2 rotations, 2 PRMT, 6 shifts, 8 LOP3 and 8 HADD2 (1.625 per weight), the MMA 1/4 per 16 rows
of x, the scale 1/8 per 128-weight group and 16 rows.  It replaces the AWQ-layout split-K decode kernel (M <= 16)
and fused GEMM (M = 17..256: ~10-11 SASS per weight per 64- or 128-row tile, 28 programs on a 7B q_proj).

The interpreter runs no assembly: there the pairs are the GEMV's fp32 reading (`int4_gemm._code_value`) minus
MAGIC_j + zero, the same numbers (tests/kernels check the assembly itself through a model of the six PTX
instructions it uses).  `tiling.native_decode_config` gives a program 128 rows and a tile of 16, 32 or 64 rows
of x, on two warps for 16 (64 rows of W each, sharing the x tile) and four for more (Triton's wgmma, a fence per
K step).

Grid (M tiles, N tiles, SPLIT_K): the programs of one N tile are neighbours, so the M tiles after the first find
its words in L2.  Rows are clamped as in the GEMV (`gemv.program`): a last tile past N reloads row N - 1 and stores
nothing there.  SPLIT_K = 1 writes y (bias included); otherwise fp32 partials [SPLIT_K, M, N] for `splitk.reduce`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2q.kernels import int4_native, splitk
from qwen2q.kernels.int4_gemm import _FIELDS, _code_value
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import Config, dot_dtype, interpreting, native_decode_config


MAGIC_BITS = {True: (0x4300, 0x3F80), False: (0x6400, 0x3C00)}  # x bf16 / fp16: 16-bit (MAGIC, 1.0): 128, 1024


def group_asm(first: int, count: int, bf16: bool) -> str:
    """PTX for codes first .. first + count - 1 of two native words (operands $count, $count + 1) with the
    group's -(MAGIC + zero) pair ($count + 2): output $i is the bf16x2 (fp16x2 when not `bf16`) pair of code
    first + i, q - zero, of the two words (the module docstring)."""
    magic, one = MAGIC_BITS[bf16]
    op = "bf16x2" if bf16 else "f16x2"
    w0, w1, nzz = count, count + 1, count + 2
    lines = ["{", ".reg .b32 a, b, lo, hi, t, one;", f"mov.b32 one, {one << 16 | one:#010x};",
             f"shf.r.wrap.b32 a, ${w0}, ${w0}, {int4_native.ROTATION};",
             f"shf.r.wrap.b32 b, ${w1}, ${w1}, {int4_native.ROTATION};"]
    if first < 4:
        lines.append("prmt.b32 lo, a, b, 0x5410;")
    if first + count > 4:
        lines.append("prmt.b32 hi, a, b, 0x7632;")
    for i, j in enumerate(range(first, first + count)):
        half, shift = ("lo" if j < 4 else "hi"), 4 * (j % 4)
        if shift:
            lines.append(f"shr.b32 t, {half}, {shift};")
            half = "t"
        lines.append(f"lop3.b32 t, {half}, 0x000F000F, {magic << 16 | magic:#010x}, 0xEA;")  # (a & b) | c
        lines.append(f"fma.rn.{op} ${i}, t, one, ${nzz};")
    return "\n".join([*lines, "}"])


# One assembly block per scale group: _ASM[bf16, group size, group g of the block], and by name (Triton reads
# module globals only as constexprs).
_ASM = {(bf16, G, g): tl.constexpr(group_asm(g * G // 16, G // 16, bf16))
        for bf16 in (True, False) for G in int4_native.GROUP_SIZES for g in range(128 // G)}
B128, H128 = _ASM[True, 128, 0], _ASM[False, 128, 0]
B64_0, B64_1, H64_0, H64_1 = _ASM[True, 64, 0], _ASM[True, 64, 1], _ASM[False, 64, 0], _ASM[False, 64, 1]
B32_0, B32_1, B32_2, B32_3 = (_ASM[True, 32, g] for g in range(4))
H32_0, H32_1, H32_2, H32_3 = (_ASM[False, 32, g] for g in range(4))


@triton.jit
def _run_asm(w, nzz, ASM: tl.constexpr, COUNT: tl.constexpr, X_BF16: tl.constexpr):
    """COUNT tensors [BLOCK_N, 16] (bf16, or fp16 when not X_BF16) from `group_asm` text ASM, two elements per
    instance."""
    DTYPE: tl.constexpr = tl.bfloat16 if X_BF16 else tl.float16
    if COUNT == 8:
        return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, nzz], dtype=(DTYPE.value,) * 8,
                                         is_pure=True, pack=2)
    elif COUNT == 4:
        return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r", [w, nzz], dtype=(DTYPE.value,) * 4, is_pure=True,
                                         pack=2)
    else:
        return tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r", [w, nzz], dtype=(DTYPE.value,) * 2, is_pure=True,
                                         pack=2)


@triton.jit
def _group_pairs(w, nzz, G: tl.constexpr, GROUP_SIZE: tl.constexpr, X_BF16: tl.constexpr):
    """The (q - zero) tiles of scale group G of a block, one per code: `group_asm`'s block for it."""
    if GROUP_SIZE == 128:
        return _run_asm(w, nzz, B128 if X_BF16 else H128, 8, X_BF16)
    elif GROUP_SIZE == 64:
        if G == 0:
            return _run_asm(w, nzz, B64_0 if X_BF16 else H64_0, 4, X_BF16)
        else:
            return _run_asm(w, nzz, B64_1 if X_BF16 else H64_1, 4, X_BF16)
    else:
        if G == 0:
            return _run_asm(w, nzz, B32_0 if X_BF16 else H32_0, 2, X_BF16)
        elif G == 1:
            return _run_asm(w, nzz, B32_1 if X_BF16 else H32_1, 2, X_BF16)
        elif G == 2:
            return _run_asm(w, nzz, B32_2 if X_BF16 else H32_2, 2, X_BF16)
        else:
            return _run_asm(w, nzz, B32_3 if X_BF16 else H32_3, 2, X_BF16)


@triton.jit
def _magic(J: tl.constexpr):
    """MAGIC_j, the value code j reads as with q = 0 (int4_native.MAGICS)."""
    if J % 3 == 0:
        return 4096.0
    elif J % 3 == 1:
        return 256.0
    else:
        return 16.0


@triton.jit
def int4_native_decode_kernel(
    # Pointers: x [M, K] (K contiguous); words, zeros, scales: int4_native's layout; bias [N] or None;
    # out: y [M, N] in x's dtype when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    x_ptr, words_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr,
    # Sizes; each program reduces BLOCKS_PER_SPLIT 128-index blocks
    M, N, BLOCKS_PER_SPLIT, TOTAL_BLOCKS,
    # Strides (out: of its split, row and column dims)
    stride_xm, stride_wn, stride_zg, stride_sg, stride_os, stride_om, stride_on,
    # Code field masks (int4_gemm._FIELDS)
    FIELD_11, FIELD_15, FIELD_19,
    # With FIXUP (`splitk.fixup_store`): y [M, N], the arrival counters, y's strides; else None, None, 0, 0
    y_ptr, counters_ptr, stride_ym, stride_yn,
    # Meta-parameters
    GROUP_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr, X_BF16: tl.constexpr, INTERPRET: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITES_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIXUP: tl.constexpr,
):
    """acc [BLOCK_N, BLOCK_M] = W x^T over the program's blocks, for its tile of x's rows; then y = acc^T (+ bias)
    or its partials (`splitk.decode_store`), or with FIXUP the partials and, in the tile's last program, y
    (`splitk.fixup_store`)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # M tiles vary fastest: they share W
    first = pid_k * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, TOTAL_BLOCKS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # as `gemv.program`: a last tile past N reloads row N - 1, stores none of it
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_c = tl.arange(0, 16)
    w_ptrs = words_ptr + rows[:, None] * stride_wn + offs_c[None, :]
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_c[:, None]  # x^T [16, BLOCK_M]: k = c, rows m
    GROUPS_PER_BLOCK: tl.constexpr = 128 // GROUP_SIZE
    CODES_PER_GROUP: tl.constexpr = GROUP_SIZE // 16
    MAGIC: tl.constexpr = 128.0 if X_BF16 else 1024.0  # group_asm's 16-bit magic
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for b in range(first, last):
        w = tl.load(w_ptrs + b * 16)
        for g in tl.static_range(GROUPS_PER_BLOCK):
            group = b * GROUPS_PER_BLOCK + g
            scale = tl.load(scales_ptr + group * stride_sg + rows).to(tl.float32)
            zero = tl.load(zeros_ptr + group * stride_zg + rows).to(tl.float32)
            if not INTERPRET:
                nzz = tl.broadcast_to((-MAGIC - zero).to(DOT_DTYPE)[:, None], (BLOCK_N, 16))  # exact
                pairs = _group_pairs(w, nzz, g, GROUP_SIZE, X_BF16)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for i in tl.static_range(CODES_PER_GROUP):
                j = g * CODES_PER_GROUP + i
                if INTERPRET:  # the same q - zero, from the GEMV's fp32 reading
                    u = w.to(tl.uint32, bitcast=True)
                    v = _code_value(u, (u >> 12) | (u << 20), u << 8, j, FIELD_11, FIELD_15, FIELD_19)
                    a = v - (_magic(j) + zero)[:, None]
                else:
                    a = pairs[i]
                # Upcast right after the load: the interpreter computes bf16 arithmetic wrongly.
                xt = tl.load(xt_ptrs + b * 128 + 16 * j, mask=m_mask[None, :], other=0.0).to(tl.float32)
                part = tl.dot(a.to(DOT_DTYPE), xt.to(DOT_DTYPE), part)
            acc += scale[:, None] * part
    # The skeletons' epilogue, on acc^T [BLOCK_M, BLOCK_N] (its SPLIT_K is only compared with 1).
    if FIXUP:
        tile = pid_m * tl.num_programs(1) + pid_n
        splitk.fixup_store(tl.trans(acc), out_ptr, y_ptr, counters_ptr, bias_ptr, pid_k, tile, tl.num_programs(2),
                           offs_m, offs_n, M, N, stride_os, stride_om, stride_on, stride_ym, stride_yn, HAS_BIAS)
    else:
        splitk.decode_store(tl.trans(acc), out_ptr, bias_ptr, pid_k, offs_m, offs_n, M, N, stride_os, stride_om,
                            stride_on, HAS_BIAS, 1 if WRITES_Y else 2)

# Past this many rows `int4_prefill` (dequantize once + cuBLAS) takes the call.  The report's model predicts this
# kernel faster at every M (tensor-bound at its dense peak), but leaves out the x tile each 128-row program reads from
# L2 (M / 33 times the weight bytes) and Triton's wgmma pipeline; at 512 it keeps a margin of 1.5x on 7B gate/up for
# both (kernels/NOTES.md, section 8).  `dev gpu-check` times both at M = 512.
MAX_M = 512


def applies(M: int) -> bool:
    """True for the rows of x this kernel takes (2..MAX_M); one row runs the GEMV, more `int4_prefill`."""
    return 2 <= M <= MAX_M


def int4_native_decode_launch(x: torch.Tensor, w: int4_native.Int4Native, bias: torch.Tensor | None,
                              out: torch.Tensor, config: Config | None = None) -> Launch:
    """The launch for x [M, K] (M = 2..MAX_M, K contiguous): grid (M / BLOCK_M, N / BLOCK_N, SPLIT_K); it writes
    out [M, N] itself when SPLIT_K == 1 or with `splitk.FIXUP`, else fp32 partials [SPLIT_K, M, N] (Launch.out) for
    `splitk.reduce`."""
    (M, K), N, G = x.shape, w.out_features, w.group_size
    config = config or native_decode_config(M, N, K, interpreting())
    if not applies(M) or K != w.in_features or x.stride(1) != 1 or config.BLOCK_M % 16 \
            or config.BLOCK_K != int4_native.BLOCK_K or not int4_native.supports(K, G):
        raise ValueError(f"{config} cannot run the int4 native decode on x {list(x.shape)} stride"
                         f" {list(x.stride())} and W [{N}, {w.in_features}], group {G}")
    blocks = K // int4_native.BLOCK_K
    per_split = triton.cdiv(blocks, config.SPLIT_K)
    split_k = triton.cdiv(blocks, per_split)  # no split left empty
    written, (stride_os, stride_om, stride_on) = splitk.target(split_k, out)
    grid = (triton.cdiv(M, config.BLOCK_M), triton.cdiv(N, config.BLOCK_N), split_k)
    result, fixup = splitk.fixup_arguments(split_k, grid[0] * grid[1], out, written)
    args = (x, w.words, w.zeros, w.scales, bias, written,
            M, N, per_split, blocks,
            x.stride(0), w.words.stride(0), w.zeros.stride(0), w.scales.stride(0), stride_os, stride_om,
            stride_on, *_FIELDS)
    kwargs = dict(GROUP_SIZE=G, DOT_DTYPE=dot_dtype(x), X_BF16=x.dtype == torch.bfloat16, INTERPRET=interpreting(),
                  HAS_BIAS=bias is not None, WRITES_Y=split_k == 1, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
                  **fixup, num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(int4_native_decode_kernel, grid, args, kwargs, config, result)


def int4_native_decode(x: torch.Tensor, w: int4_native.Int4Native, bias: torch.Tensor | None, out: torch.Tensor,
                       config: Config | None = None) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T + bias for M = 2..MAX_M, from the native layout; one launch when SPLIT_K == 1."""
    return splitk.finish(int4_native_decode_launch(x, w, bias, out, config), bias, out)

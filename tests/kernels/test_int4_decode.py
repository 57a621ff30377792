"""int4 for 2..MAX_M rows on the native layout (`kernels/int4_decode.py`): outputs against the float64 reference for
every group size, split and output dtype; clamped last tiles; which calls take it."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import numpy as np
import pytest
import torch

from qwen2q.kernels import int4_decode, int4_gemm, int4_native, int4_prefill, splitk, triton_ops
from qwen2q.kernels.int4_decode import MAX_M
from qwen2q.kernels.tiling import Config, native_decode_config


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("M, block_m", [(2, 16), (5, 16), (16, 16), (17, 32), (33, 64), (64, 64), (150, 64)])
@pytest.mark.parametrize("G", int4_native.GROUP_SIZES)
def test_outputs_match_the_float64_reference(G, M, block_m, split_k):
    """y (bias included, one launch) at SPLIT_K = 1, fp32 partials reduced at SPLIT_K = 3; bf16 and fp16 x; x tiles
    of 16, 32 and 64 rows, full and padded, one or three of them; every output (poisoned with NaN) written."""
    K, N = 896, 128
    w, W = kt.reference_weight("int4", K, N, G)
    dtype = (torch.bfloat16, torch.float16)[(M + split_k) % 2]
    x, bias, out = kt.inputs(M, K, N, dtype, M != 5)
    launch = int4_decode.int4_native_decode_launch(x, int4_native.from_awq(w), bias, out,
                                                   Config(block_m, 64, 128, SPLIT_K=split_k, num_warps=1))
    assert (launch.out is out) == (split_k == 1) and launch.grid == (-(-M // block_m), N // 64, split_k)
    assert splitk.finish(launch, bias, out) is out
    kt.assert_close(out, kt.reference(x, W, bias), dtype)


def test_a_last_tile_past_n_stores_nothing_past_n():
    """N = 80 with 64-row tiles: the second program reloads row 79 for its 48 extra rows and stores none of them."""
    K, N, M = 384, 80, 4
    w, W = kt.reference_weight("int4", K, N, 64)
    x, bias, _ = kt.inputs(M, K, N, torch.bfloat16, True)
    buffer = torch.full((M, N + 48), float("nan"), dtype=torch.bfloat16, device=kt.DEVICE)
    out = buffer[:, :N]
    for split_k in (1, 2):
        launch = int4_decode.int4_native_decode_launch(x, int4_native.from_awq(w), bias, out,
                                                       Config(16, 64, 128, SPLIT_K=split_k, num_warps=1))
        assert launch.grid == (1, 2, split_k)
        splitk.finish(launch, bias, out)
        kt.assert_close(out, kt.reference(x, W, bias), x.dtype)
        assert torch.isnan(buffer[:, N:]).all()


def test_calls_it_cannot_run_are_refused():
    w = int4_native.from_awq(kt.reference_weight("int4", 256, 64, 128)[0])
    for M, stride in ((1, None), (MAX_M + 1, None), (4, 2)):
        x = torch.zeros(M, 256 * (stride or 1), dtype=torch.bfloat16)[:, ::stride or 1]
        with pytest.raises(ValueError, match="cannot run the int4 native decode"):
            int4_decode.int4_native_decode_launch(x, w, None, torch.empty(M, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("M", [2, 16, 17, 64, 256, int4_decode.MAX_M])
@pytest.mark.parametrize("N, K", [(18944, 3584), (3584, 18944), (512, 3584), (29568, 8192)])
def test_config_fills_the_gpu_without_empty_splits(N, K, M):
    """On a GPU: 128-row tiles of W, x tiles of 16, 32 or 64 rows (two warps for 16, four for more), and as many
    splits as ~2 programs per SM need (at most one per block)."""
    c = native_decode_config(M, N, K, interpret=False)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    assert (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.num_warps, c.num_stages) == (block_m, 128, 128, 2 if M <= 16 else 4, 3)
    tiles = -(-N // 128) * -(-M // block_m)
    assert 1 <= c.SPLIT_K <= K // 128
    assert tiles * c.SPLIT_K >= min(2 * 132, tiles * (K // 128)) and tiles * (c.SPLIT_K - 1) < 2 * 132


def test_two_to_max_m_rows_run_it_when_the_native_layout_is_there(monkeypatch):
    """The op: M = 1 -> the GEMV, M = 2..MAX_M -> this kernel, more -> the native layout dequantized for cuBLAS, all
    from one weight; without the native layout, M = 2..16 takes the AWQ-layout decode kernel and M = 17 the GEMM."""
    calls = []
    for module, name in ((int4_gemm, "int4_gemv"), (int4_decode, "int4_native_decode"), (int4_gemm, "int4_decode"),
                         (int4_gemm, "int4_gemm"), (int4_prefill, "int4_native_linear")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    K, N = 256, 64
    w, W = kt.reference_weight("int4", K, N, 128)
    native = int4_native.from_awq(w)
    for M, with_native, path in ((1, True, "int4_gemv"), (2, True, "int4_native_decode"),
                                 (16, True, "int4_native_decode"), (17, True, "int4_native_decode"),
                                 (MAX_M, True, "int4_native_decode"), (MAX_M + 1, True, "int4_native_linear"),
                                 (3, False, "int4_decode"), (17, False, "int4_gemm")):
        x, bias, out = kt.inputs(M, K, N, torch.bfloat16, True)
        triton_ops.int4_linear(x, w, bias, out=out, native=native if with_native else None)
        assert calls.pop() == path, (M, with_native)
        kt.assert_close(out, kt.reference(x, W, bias), x.dtype)


# ---- the inline assembly, run through a model of the PTX instructions it uses (the interpreter runs none) ----

MASK32 = 0xFFFFFFFF


def _half_to_float(h: int, bf16: bool) -> float:
    return float(np.uint32(h << 16).view(np.float32)) if bf16 else float(np.uint16(h).view(np.float16))


def _float_to_half(v: float, bf16: bool) -> int:
    """The 16-bit pattern of v, which must be exact in the type (the assembly only makes small integers)."""
    h = int(np.float32(v).view(np.uint32)) >> 16 if bf16 else int(np.float16(v).view(np.uint16))
    assert _half_to_float(h, bf16) == v, f"{v} is not exact in {'bf16' if bf16 else 'fp16'}"
    return h


def _run_ptx(text: str, operands: dict[int, int]) -> dict[int, int]:
    """Execute `group_asm` text with its operand registers ($n -> 32-bit value); returns them after."""
    regs = {f"${n}": v for n, v in operands.items()}

    def val(token: str) -> int:
        return regs[token] if token in regs else int(token, 0) & MASK32

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            regs[d] = val(src[0])
        elif op == "shf.r.wrap.b32":  # the 64-bit b:a shifted right by c mod 32, low word
            a, b, c = val(src[0]), val(src[1]), val(src[2]) % 32
            regs[d] = ((b << 32 | a) >> c) & MASK32
        elif op == "prmt.b32":  # default mode: byte i of d is byte (selector nibble i) of b:a
            pool, sel = (val(src[1]) << 32 | val(src[0])), val(src[2])
            regs[d] = sum(((pool >> 8 * ((sel >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "shr.b32":
            regs[d] = val(src[0]) >> val(src[1])
        elif op == "lop3.b32":  # bit i of d: bit (a_i b_i c_i) of the lookup table
            a, b, c, lut = (val(t) for t in src)
            regs[d] = sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            bf16 = op == "fma.rn.bf16x2"
            a, b, c = (val(t) for t in src)
            halves = [_half_to_float(x >> s & 0xFFFF, bf16) for s in (0, 16) for x in (a, b, c)]
            lo, hi = halves[0] * halves[1] + halves[2], halves[3] * halves[4] + halves[5]
            regs[d] = _float_to_half(lo, bf16) | _float_to_half(hi, bf16) << 16
        else:
            raise AssertionError(f"the model has no {op}")
    return regs


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("G", int4_native.GROUP_SIZES)
def test_the_assembly_makes_each_codes_q_minus_zero_pair(G, bf16):
    """For every word pair (c, c + 1) of a row and every group of a block, output i of the group's assembly block
    holds code first + i of word c in its low half and of word c + 1 in its high half, as q - zero, exact: what
    `tl.dot` must see for k = 16 j + c and 16 j + c + 1 (and what the interpreter path computes)."""
    codes = torch.randint(0, 16, (3, 256), generator=kt.generator("asm", G), dtype=torch.uint8)
    words = int4_native.pack_codes(codes).long() & MASK32
    magic = 128 if bf16 else 1024
    for zero in (0, 7, 15):
        nzz = _float_to_half(-float(magic + zero), bf16)
        for g in range(128 // G):
            first, count = g * G // 16, G // 16
            text = int4_decode.group_asm(first, count, bf16)
            for n in range(3):
                for block in (0, 1):
                    for c in range(0, 16, 2):
                        w0, w1 = (int(words[n, 16 * block + c + e]) for e in (0, 1))
                        regs = _run_ptx(text, {count: w0, count + 1: w1, count + 2: nzz | nzz << 16})
                        for i in range(count):
                            k = 128 * block + 16 * (first + i) + c
                            got = [_half_to_float(regs[f"${i}"] >> s & 0xFFFF, bf16) for s in (0, 16)]
                            assert got == [int(codes[n, k]) - zero, int(codes[n, k + 1]) - zero], (g, i, n, c)


def test_the_kernel_embeds_the_assembly_it_was_tested_with():
    """The constexpr table the kernel selects from holds `group_asm`'s text for every group size and dtype."""
    for (bf16, G, g), text in int4_decode._ASM.items():
        assert text.value == int4_decode.group_asm(g * G // 16, G // 16, bf16)
    assert int4_decode.B128.value == int4_decode.group_asm(0, 8, True)
    assert int4_decode.H32_3.value == int4_decode.group_asm(6, 2, False)

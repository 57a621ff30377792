"""Shared set-up of the kernel tests: the Triton interpreter, random quantized weights, the error bound.

Every tests/kernels/test_*.py imports this first, so TRITON_INTERPRET=1 is set before the kernels are
decorated (set TRITON_INTERPRET=0 on a GPU machine to run the same tests on CUDA). It is not a
conftest.py: a second module named `conftest` replaces tests/conftest.py in sys.modules and breaks the
`from conftest import ...` of the top-level tests collected after it.
"""
from __future__ import annotations

import functools
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from qwen2q.quantizers import int4, int8, nf4  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
if INTERPRET:
    import triton.language as tl  # noqa: E402
    from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

    # Triton decides at import whether its own jit helpers (tl.zeros, ...) are interpreted.
    if not isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (by a test module collected"
                           " earlier); export TRITON_INTERPRET=1 or run tests/kernels in a pytest process of its own")
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

# Rows of x: the GEMV (1), the split-K tl.dot decode (3, 16: a padded and a full 16-row tile), the GEMM (33, 128).
MS = (1, 3, 16, 33, 128)
# (K, N) of Qwen2 projections: 0.5B q/o (896x896), k/v (896x128), gate/up (896x4864), down (4864x896).
QWEN2_SHAPES = ((896, 896), (896, 128), (896, 4864), (4864, 896))
# 7B gate/up: tested at decode sizes only (each call dequantizes 68M weights in the interpreter).
BIG_SHAPE, BIG_MS = (3584, 18944), (1, 16)

# Unit roundoff of the output dtype. A correct kernel rounds once to the output, error <= u relative;
# the interpreter's fp32 -> bf16 cast truncates instead (<= 2u). On a GPU, tl.dot also sees W rounded to
# x's dtype: relative noise ~u/sqrt(3) per weight, averaged over the K sum, which the 4u * rms term
# covers elementwise at more than 6 sigma.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _case(m, shape, dtype, has_bias):
    name = f"M{m}-{shape[0]}x{shape[1]}-{str(dtype).removeprefix('torch.')}-{'bias' if has_bias else 'nobias'}"
    return pytest.param(m, shape, dtype, has_bias, id=name)


def matrix(shapes):
    """(M, (K, N), dtype, has_bias) cases: every M with every shape (shape-major, so consecutive tests share
    a weight), dtype and bias alternating so that each M sees all four (dtype, bias) pairs."""
    return [_case(m, shape, (torch.bfloat16, torch.float16)[(i + j) % 2], (j // 2 + i) % 2 == 0)
            for j, shape in enumerate(shapes) for i, m in enumerate(MS)]


def big_cases():
    return [_case(m, BIG_SHAPE, dtype, has_bias)
            for m, dtype, has_bias in zip(BIG_MS, (torch.bfloat16, torch.float16), (True, False))]


def generator(*key) -> torch.Generator:
    """A generator seeded from `key`, the same in every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _random_words(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-2**31, 2**31, (rows, cols), generator=g, dtype=torch.int64).to(torch.int32)


def random_int4(K: int, N: int, group_size: int, seed: int = 0) -> int4.Int4Weight:
    """Random words (every nibble value, the sign bit included), random zeros, positive fp16 scales."""
    g = generator("int4", K, N, group_size, seed)
    qweight, qzeros = _random_words(K, N // 8, g), _random_words(K // group_size, N // 8, g)
    scales = (torch.rand(K // group_size, N, generator=g) * 0.01 + 0.001).to(torch.float16)
    return int4.Int4Weight(qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE))


def random_nf4(K: int, N: int, seed: int = 0) -> nf4.NF4Weight:
    """Random NF4 codes and absmax codes; nested scales and offset put every absmax in [0.01, 0.03]."""
    g = generator("nf4", K, N, seed)
    n = N * K
    blocks = -(-n // nf4.BLOCK_SIZE)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=g, dtype=torch.uint8)
    absmax = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8)
    nested = torch.rand(-(-blocks // nf4.NESTED_BLOCK_SIZE), generator=g) * 0.002 + 0.009
    return nf4.NF4Weight(packed.to(DEVICE), absmax.to(DEVICE), nested.to(DEVICE), 0.02, (N, K), torch.bfloat16)


def random_int8(K: int, N: int, seed: int = 0) -> int8.Int8Weight:
    g = generator("int8", K, N, seed)
    qweight = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    absmax = torch.rand(N, generator=g) * 0.1 + 0.01
    return int8.Int8Weight(qweight.to(DEVICE), absmax.to(DEVICE))


@functools.lru_cache(maxsize=2)
def reference_weight(fmt: str, *args) -> tuple[object, torch.Tensor]:
    """(weight, W fp32 [N, K] from the format's reference dequantize), kept for the next test of the shape."""
    w = {"int4": random_int4, "nf4": random_nf4, "int8": random_int8}[fmt](*args)
    return w, {"int4": int4, "nf4": nf4, "int8": int8}[fmt].dequantize(w, torch.float32)


def inputs(M: int, K: int, N: int, dtype: torch.dtype, has_bias: bool, seed: int = 0):
    """(x [M, K], bias [N] or None, out [M, N] poisoned with NaN) on DEVICE."""
    g = generator("x", M, K, N, seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(N, generator=g).to(dtype).to(DEVICE) if has_bias else None
    return x, bias, torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)


def reference(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias in float64 on the CPU (in column chunks, so a 68M-weight W is never all float64)."""
    x64 = x.double().cpu()
    chunks = [x64 @ W[n:n + 2048].double().cpu().t() for n in range(0, W.shape[0], 2048)]
    y = torch.cat(chunks, dim=-1)
    return y + bias.double().cpu() if bias is not None else y


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """All finite (the NaN poison is gone), normwise relative error <= 2u, every element within
    2u |ref| + 4u rms(ref)."""
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all(), f"{(~torch.isfinite(y)).sum().item()} outputs not written or not finite"
    u = UNIT_ROUNDOFF[dtype]
    err = y.double().cpu() - ref
    normwise = (err.norm() / ref.norm()).item()
    assert normwise <= 2 * u, f"normwise relative error {normwise:.3g} > {2 * u:.3g}"
    bound = 2 * u * ref.abs() + 4 * u * ref.pow(2).mean().sqrt()
    worst = (err.abs() / bound).max().item()
    assert worst <= 1, f"an element is off by {worst:.3g} x its bound"

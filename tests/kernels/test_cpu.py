"""The CPU backend (qwen2q.kernels.cpu) against float64 dequantize oracles written from each format's formula,
and against the reference path (dequantize, then F.linear).

Tolerances: u = 2**-8, the unit roundoff of bf16.  The exact paths (many rows of every format; NF4 at every
M where bitsandbytes' kernel cannot run) must give the reference's bf16 W bit for bit, and y within
fp32-accumulation noise of x @ W^T.  The kernel paths (few rows) must stay within the bound their docstring
derives, elementwise.
"""
import dataclasses
import zlib

import pytest
import torch
import torch.nn.functional as F

from qwen2q import kernels
from qwen2q.kernels import cpu
from qwen2q.quantizers import ct_pack, int4, int8, nf4, registry

U = 2.0**-8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column 8c + AWQ_ORDER[i] (AutoAWQ's pack order)
# (K, N) of Qwen2-0.5B's projections, small enough for CPU tests: k/v 896 x 128, and a down_proj-like 4864 x 128
SHAPES = ((896, 128), (256, 192), (4864, 128))


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_int4(K, N, G):
    g = generator("int4", K, N, G)
    words = lambda rows: torch.randint(-2**31, 2**31, (rows, N // 8), generator=g, dtype=torch.int64)  # noqa: E731
    scales = (torch.rand(K // G, N, generator=g) * 0.01 + 0.001).to(torch.float16)
    return int4.Int4Weight(words(K).to(torch.int32), words(K // G).to(torch.int32), scales)


def random_int8(K, N):
    g = generator("int8", K, N)
    return int8.Int8Weight(torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8),
                           torch.rand(N, generator=g) * 0.1 + 0.01)


def random_nf4(K, N):
    return nf4.quantize(torch.randn(N, K, generator=generator("nf4", K, N)).to(torch.bfloat16))


def int4_oracle(w: int4.Int4Weight):
    """(W float64 [N, K], q [K, N], z [K / G, N], s [K / G, N]) from W = (q - z) * s."""
    def nibbles(words):
        out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
        for i, column in enumerate(AWQ_ORDER):
            out[:, column::8] = (words.long() >> (4 * i)) & 0xF
        return out

    q, z, s = nibbles(w.qweight), nibbles(w.qzeros), w.scales.double()
    G = w.qweight.shape[0] // w.scales.shape[0]
    W = (q - z.repeat_interleave(G, 0)) * s.repeat_interleave(G, 0)
    return W.t(), q, z, s


def int8_oracle(w: int8.Int8Weight):
    return w.qweight.double() * w.absmax.double()[:, None] / 127


def nf4_oracle(w: nf4.NF4Weight):
    packed = w.packed.view(-1).long()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1)
    absmax = (nf4.dynamic_map().double()[w.absmax.long()]
              * w.nested_absmax.double().repeat_interleave(nf4.NESTED_BLOCK_SIZE)[: w.absmax.numel()] + w.offset)
    return (nf4.NF4_LEVELS.double()[codes] * absmax.repeat_interleave(nf4.BLOCK_SIZE)).view(w.shape)


def inputs(M, K, N, has_bias, lead=()):
    g = generator("x", M, K, N)
    x = torch.randn(*lead, M, K, generator=g).to(torch.bfloat16)
    bias = torch.randn(N, generator=g).to(torch.bfloat16) if has_bias else None
    return x, bias


def exact(x, W, bias):
    y = x.double().reshape(-1, W.shape[1]) @ W.t()
    return (y + bias.double() if bias is not None else y).view(*x.shape[:-1], W.shape[0])


def assert_within(y, ref, bound):
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    worst = ((y.double() - ref).abs() / bound).max().item()
    assert worst <= 1, f"an element is off by {worst:.3g} x its bound"


def accumulation_bound(x, W, bias, ref):
    """Rounding of y (and of y + bias) to bf16, plus fp32 accumulation over K: what two correct GEMMs on the
    same bf16 W and x may differ by."""
    K = W.shape[1]
    mass = exact(x.abs(), W.abs(), None)
    return 2 * U * ref.abs() + K * 2.0**-23 * mass + (U * bias.double().abs() if bias is not None else 0) + 1e-30


def prepared(fmt_name, w):
    fmt = registry.get(fmt_name)
    p = kernels.prepare(fmt, w, torch.bfloat16)
    assert p is not None
    return fmt, p


@pytest.mark.parametrize("K, N, G", [(896, 128, 128), (256, 192, 32), (4864, 128, 64), (128, 64, 128)])
def test_int4_dequantize_is_the_reference_bit_for_bit(K, N, G):
    w = random_int4(K, N, G)
    _, p = prepared("awq-gemm", w)
    WT = p.dequantize(torch.full((N * K,), float("nan"), dtype=torch.bfloat16))
    assert torch.equal(WT.t(), int4.dequantize(w, torch.bfloat16))
    assert torch.equal(WT.t(), int4_oracle(w)[0].to(torch.bfloat16))  # (q - z) * s is exact in fp32


@pytest.mark.parametrize("M", [1, 3, cpu.INT4_KERNEL_ROWS])
@pytest.mark.parametrize("K, N, G", [(896, 128, 128), (256, 192, 32), (4864, 128, 64)])
def test_int4_kernel_rows_stay_within_the_scale_zero_rounding_bound(M, K, N, G):
    w = random_int4(K, N, G)
    W, q, z, s = int4_oracle(w)
    x, bias = inputs(M, K, N, has_bias=M != 3)
    _, p = prepared("awq-gemm", w)
    y = p.linear(x, bias)
    ref = exact(x, W, bias)
    # |W' - W| <= u s (|q - z| + |8 - z| (1 + u)) per weight (the bf16 scale and zero), summed against |x|
    Gs = lambda t: t.repeat_interleave(G, 0)  # noqa: E731
    weight_error = (U * Gs(s) * ((q - Gs(z)).abs() + (8 - Gs(z)).abs() * (1 + U))).t()
    bound = exact(x.abs(), weight_error, None) + U * exact(x.abs(), W.abs(), None) + accumulation_bound(x, W, bias, ref)
    assert_within(y, ref, bound)
    # a real bound, not a loose one: the typical error is a small fraction of it
    assert ((y.double() - ref).abs() / bound).mean() < 0.05


@pytest.mark.parametrize("M", [cpu.INT4_KERNEL_ROWS + 1, 64])
def test_int4_many_rows_run_the_exact_weight(M):
    K, N, G = 896, 192, 128
    w = random_int4(K, N, G)
    x, bias = inputs(M, K, N, has_bias=True)
    _, p = prepared("awq-gemm", w)
    W = int4.dequantize(w, torch.bfloat16).double()
    ref = exact(x, W, bias)
    assert_within(p.linear(x, bias), ref, accumulation_bound(x, W, bias, ref))


@pytest.mark.parametrize("K, N", SHAPES)
def test_int8_dequantize_is_the_reference_bit_for_bit(K, N):
    w = random_int8(K, N)
    _, p = prepared("bnb-int8", w)
    W = p.dequantize(torch.full((N * K,), float("nan"), dtype=torch.bfloat16))
    assert torch.equal(W, int8.dequantize(w, torch.bfloat16))
    assert ((W.double() - int8_oracle(w)).abs() <= U * int8_oracle(w).abs()).all()


@pytest.mark.parametrize("M", [1, 2, cpu.INT8_KERNEL_ROWS, cpu.INT8_KERNEL_ROWS + 1, 40])
@pytest.mark.parametrize("K, N", SHAPES)
def test_int8_linear_within_bound(M, K, N):
    w = random_int8(K, N)
    W = int8_oracle(w)
    x, bias = inputs(M, K, N, has_bias=M % 2 == 0)
    _, p = prepared("bnb-int8", w)
    ref = exact(x, W, bias)
    # the kernel rows round the row scale to bf16 (<= u |y| more); the exact rows round each weight to bf16
    bound = U * exact(x.abs(), W.abs(), None) + accumulation_bound(x, W, bias, ref)
    assert_within(p.linear(x, bias), ref, bound)


@pytest.mark.parametrize("offset", [1, 3])
def test_int8_kernel_takes_unaligned_activations_and_weights(offset):
    K, N, M = 896, 128, 5
    w = random_int8(K, N)
    shifted = torch.empty(N * K + 64, dtype=torch.int8)[offset : offset + N * K].view(N, K)
    shifted.copy_(w.qweight)
    _, p = prepared("bnb-int8", dataclasses.replace(w, qweight=shifted))
    x, _ = inputs(M, K, N, False)
    x_shifted = torch.empty(M * K + 64, dtype=torch.bfloat16)[offset : offset + M * K].view(M, K)
    x_shifted.copy_(x)
    assert torch.equal(p.linear(x_shifted, None), p.linear(x, None))  # and it did not crash (torch's kernel would)


@pytest.mark.parametrize("K, N", SHAPES + ((96, 2),))  # 96 x 2: 64-blocks that straddle rows
def test_nf4_dequantize_is_the_reference_bit_for_bit(K, N):
    w = random_nf4(K, N)
    _, p = prepared("bnb-nf4", w)
    W = p.dequantize(torch.full((N * K,), float("nan"), dtype=torch.bfloat16))
    assert torch.equal(W, nf4.dequantize(w, torch.bfloat16))
    oracle = nf4_oracle(w)
    assert ((W.double() - oracle).abs() <= U * oracle.abs() + 1e-6 * oracle.abs().max()).all()


@pytest.mark.parametrize("K, N", SHAPES)
def test_nf4_dequantize_without_bitsandbytes_library_is_the_reference_too(K, N, monkeypatch):
    w = random_nf4(K, N)
    _, p = prepared("bnb-nf4", w)
    monkeypatch.setattr(cpu, "nf4_dequantizer", lambda: None)  # as where bitsandbytes has no C dequantize
    W = p.dequantize(torch.full((N * K,), float("nan"), dtype=torch.bfloat16))
    assert torch.equal(W, nf4.dequantize(w, torch.bfloat16))


def nf4_codes(w: nf4.NF4Weight) -> torch.Tensor:
    packed = w.packed.view(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).view(w.shape)


needs_nf4_kernel = pytest.mark.skipif(cpu.nf4_kernel() is None,
                                      reason="bitsandbytes' CPU NF4 kernel cannot run here (library or CPU)")


@pytest.mark.parametrize("K, N", [(896, 128), (64, 32), (4864, 96)])
def test_nf4_kernel_layout_is_the_one_bitsandbytes_writes(K, N):
    """Oracle: bitsandbytes' own converter to its CPU layout, on a weight it quantized itself."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    convert = getattr(bnb_functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU layout converter")
    W = torch.randn(N, K, generator=generator("layout", K, N)).to(torch.bfloat16)
    qweight, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
    codes = torch.stack([qweight.view(-1) >> 4, qweight.view(-1) & 0xF], dim=-1).view(N, K)
    theirs, _ = convert(qweight, state)
    assert torch.equal(cpu.bnb_cpu_layout(codes), theirs)


@needs_nf4_kernel
@pytest.mark.parametrize("M", [1, 3, cpu.NF4_KERNEL_ROWS])
@pytest.mark.parametrize("K, N", SHAPES)
def test_nf4_kernel_rows_stay_within_the_bf16_absmax_and_weight_rounding(M, K, N):
    w = random_nf4(K, N)
    W = nf4_oracle(w)
    x, bias = inputs(M, K, N, has_bias=M != 3)
    _, p = prepared("bnb-nf4", w)
    assert p.kernel_codes is not None
    ref = exact(x, W, bias)
    # |W' - W| <= u |W| (1 + u / 4) per weight (the bf16 absmax, then the bf16 weight), summed against |x|
    bound = U * (1 + U / 4) * exact(x.abs(), W.abs(), None) + accumulation_bound(x, W, bias, ref)
    y = p.linear(x, bias)
    assert_within(y, ref, bound)
    assert ((y.double() - ref).abs() / bound).mean() < 0.1  # a real bound: random-sign errors stay far below it
    # and exactly the weight the derivation says the kernel multiplies by: bf16(level) * bf16(absmax)
    absmax = nf4.decode_absmax(w).to(torch.bfloat16).double().repeat_interleave(nf4.BLOCK_SIZE).view(N, K)
    W_kernel = nf4.NF4_LEVELS.to(torch.bfloat16).double()[nf4_codes(w).long()] * absmax
    ref_kernel = exact(x, W_kernel, bias)
    assert_within(y, ref_kernel, accumulation_bound(x, W_kernel, bias, ref_kernel))


@needs_nf4_kernel
@pytest.mark.parametrize("offset", [1, 3])
def test_nf4_kernel_takes_unaligned_activations(offset):
    K, N, M = 896, 128, 2
    _, p = prepared("bnb-nf4", random_nf4(K, N))
    x, _ = inputs(M, K, N, False)
    x_shifted = torch.empty(M * K + 64, dtype=torch.bfloat16)[offset : offset + M * K].view(M, K)
    x_shifted.copy_(x)
    assert torch.equal(p.linear(x_shifted, None), p.linear(x, None))


def test_nf4_without_the_kernel_runs_the_exact_weight_at_every_m():
    K, N = 896, 128
    w = random_nf4(K, N)
    _, p = prepared("bnb-nf4", w)
    p = dataclasses.replace(p, kernel_codes=None, kernel_absmax=None)  # as where bitsandbytes' kernel cannot run
    W = nf4.dequantize(w, torch.bfloat16).double()
    for M in (1, 2):
        x, bias = inputs(M, K, N, has_bias=True)
        ref = exact(x, W, bias)
        assert_within(p.linear(x, bias), ref, accumulation_bound(x, W, bias, ref))


@pytest.mark.parametrize("M", [cpu.NF4_KERNEL_ROWS // 2 + 1, cpu.NF4_KERNEL_ROWS])  # x [2, M, K]: 2M rows
def test_nf4_many_rows_run_the_reference_weight(M):
    K, N = 896, 128
    w = random_nf4(K, N)
    x, bias = inputs(M, K, N, has_bias=M % 2 == 0, lead=(2,))
    _, p = prepared("bnb-nf4", w)
    W = nf4.dequantize(w, torch.bfloat16).double()
    ref = exact(x, W, bias)
    y = p.linear(x, bias)
    assert y.shape == (2, M, N)
    assert_within(y, ref, accumulation_bound(x, W, bias, ref))


@pytest.mark.parametrize("name, w", [("awq-gemm", random_int4(256, 64, 64)), ("bnb-int8", random_int8(256, 64)),
                                     ("bnb-nf4", random_nf4(256, 64))])
def test_bf16_cache_is_the_reference_path(name, w):
    fmt = registry.get(name)
    p = kernels.prepare(fmt, w, torch.bfloat16, cache="bf16")
    assert isinstance(p, cpu.DensePrepared) and p.weight.dtype == torch.bfloat16
    x, bias = inputs(3, 256, 64, True)
    assert torch.equal(kernels.linear(fmt, x, w, bias, p), F.linear(x, fmt.dequantize(w, torch.bfloat16), bias))


def test_dispatch_picks_the_cpu_backend_for_bf16_and_the_reference_when_asked(monkeypatch):
    w = random_int4(256, 64, 64)
    fmt, p = prepared("awq-gemm", w)
    x, _ = inputs(2, 256, 64, False)
    assert kernels.backend(x, p) == "cpu"
    assert kernels.backend(x.float(), p) == "reference"
    assert kernels.backend(x, None) == "reference"
    reference = F.linear(x, int4.dequantize(w, torch.bfloat16))
    assert not torch.equal(kernels.linear(fmt, x, w, None, p), reference)  # the kernel's bf16 scales show
    monkeypatch.setenv(kernels.ENV, "reference")
    assert kernels.backend(x, p) == "reference"
    assert torch.equal(kernels.linear(fmt, x, w, None, p), reference)


def test_shapes_and_dtypes_the_backend_does_not_take_give_none():
    assert kernels.prepare(registry.get("awq-gemm"), random_int4(128, 32, 32), torch.bfloat16) is None  # N % 64
    assert kernels.prepare(registry.get("bnb-nf4"), random_nf4(24, 2), torch.bfloat16) is None  # n % 64
    assert kernels.prepare(registry.get("bnb-int8"), random_int8(64, 64), torch.float32) is None
    with pytest.raises(ValueError, match="cache='fp8'; use None or one of"):
        kernels.prepare(registry.get("bnb-int8"), random_int8(64, 64), torch.bfloat16, cache="fp8")


def test_a_shared_workspace_serves_linears_of_every_shape_in_turn():
    workspace = cpu.Workspace()
    weights = [("bnb-nf4", random_nf4(896, 128)), ("awq-gemm", random_int4(256, 192, 32)),
               ("bnb-int8", random_int8(4864, 128)), ("bnb-nf4", random_nf4(256, 64))]
    formats = [registry.get(name) for name, _ in weights]
    preps = [kernels.prepare(f, w, torch.bfloat16, workspace=workspace) for f, (_, w) in zip(formats, weights)]
    for _ in range(2):
        for fmt, (_, w), p in zip(formats, weights, preps):
            K = fmt.shape(w)[1]
            x, bias = inputs(cpu.NF4_KERNEL_ROWS + 1, K, fmt.shape(w)[0], True)  # the exact path of every format
            W = fmt.dequantize(w, torch.bfloat16).double()
            ref = exact(x, W, bias)
            assert_within(p.linear(x, bias), ref, accumulation_bound(x, W, bias, ref))


def test_autograd_and_inference_mode_both_work_with_the_workspace():
    w = random_nf4(256, 64)
    fmt, p = prepared("bnb-nf4", w)
    with torch.inference_mode():
        first = p.linear(inputs(40, 256, 64, False)[0], None)
    x = inputs(40, 256, 64, False)[0].requires_grad_()
    y = p.linear(x, None)
    p.linear(inputs(40, 256, 64, False, lead=(3,))[0], None)  # reuses the workspace before backward runs
    y.float().sum().backward()
    W = nf4.dequantize(w, torch.bfloat16)
    assert torch.allclose(x.grad.float(), W.float().sum(0).expand(40, -1), rtol=2 * U, atol=1e-3)
    assert torch.equal(first, p.linear(inputs(40, 256, 64, False)[0], None))


@pytest.mark.parametrize("name, w", [("awq-gemm", random_int4(256, 64, 64)), ("bnb-int8", random_int8(256, 64)),
                                     ("bnb-nf4", random_nf4(256, 64))])
def test_no_rows_give_an_empty_output(name, w):
    _, p = prepared(name, w)
    assert p.linear(torch.empty(2, 0, 256, dtype=torch.bfloat16), None).shape == (2, 0, 64)


# --- compressed-tensors pack-quantized: the int4 and int8 paths on its own tensors ---------------------------

def random_ct(K, N, bits, group_size, symmetric):
    fmt = registry.get("ct-pack")
    W = torch.randn(N, K, generator=generator("ct", K, N, bits, group_size, symmetric)) * 0.05
    return fmt.quantize(W.to(torch.bfloat16), {"bits": bits, "group_size": group_size, "symmetric": symmetric})


def ct_oracle(w: ct_pack.PackedWeight):
    """W float64 [N, K] = (c - z) * s, from the stored integers (unpack is checked against compressed-tensors
    itself in tests/quantizers/test_ct_pack.py)."""
    N, K = w.shape
    G = K // w.scale.shape[1]
    c = ct_pack.unpack(w.packed, w.bits).double()
    z = ct_pack.unpack(w.zero.t().contiguous(), w.bits).t().double() if w.zero is not None else torch.zeros(1, 1)
    return (c - z.repeat_interleave(G, 1) if w.zero is not None else c) * w.scale.double().repeat_interleave(G, 1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("M", [1, cpu.INT4_KERNEL_ROWS, cpu.INT4_KERNEL_ROWS + 1])
def test_compressed_tensors_w4a16_runs_the_int4_paths(M, symmetric):
    K, N, G = 896, 128, 128
    w = random_ct(K, N, 4, G, symmetric)
    _, p = prepared("ct-pack", w)
    assert isinstance(p, cpu.Int4Prepared)
    W = ct_oracle(w)
    WT = p.dequantize(torch.full((N * K,), float("nan"), dtype=torch.bfloat16))
    assert torch.equal(WT.t(), registry.get("ct-pack").dequantize(w, torch.bfloat16))  # the reference, bit for bit
    assert torch.equal(WT.t(), W.to(torch.bfloat16))
    x, bias = inputs(M, K, N, has_bias=True)
    ref = exact(x, W, bias)
    y = p.linear(x, bias)
    if M <= cpu.INT4_KERNEL_ROWS:  # the int4 bound with the AWQ-form zero z + 8 (8 when symmetric)
        s = w.scale.double().t().repeat_interleave(G, 0)  # [K, N]
        c = ct_pack.unpack(w.packed, 4).double().t()
        z = (ct_pack.unpack(w.zero.t().contiguous(), 4).double() if w.zero is not None
             else torch.zeros(K // G, N, dtype=torch.float64)).repeat_interleave(G, 0)
        weight_error = (U * s * ((c - z).abs() + z.abs() * (1 + U))).t()
        bound = exact(x.abs(), weight_error, None) + U * exact(x.abs(), W.abs(), None) + accumulation_bound(x, W, bias, ref)
        assert_within(y, ref, bound)
    else:  # the reference's W and the same GEMM: the reference path's y exactly, W laid out as the backend lays
        # it (W^T contiguous: a GEMM without native bf16, as on an AVX2-only CPU, sums in another order per layout)
        reference_w = registry.get("ct-pack").dequantize(w, torch.bfloat16)
        assert torch.equal(y, F.linear(x, reference_w.t().contiguous().t(), bias))


@pytest.mark.parametrize("M", [1, cpu.INT8_KERNEL_ROWS + 1])
def test_compressed_tensors_w8a16_per_channel_runs_the_int8_paths(M):
    K, N = 896, 128
    w = random_ct(K, N, 8, 0, True)
    _, p = prepared("ct-pack", w)
    assert isinstance(p, cpu.Int8Prepared)
    W = ct_oracle(w)
    x, bias = inputs(M, K, N, has_bias=True)
    ref = exact(x, W, bias)
    bound = U * exact(x.abs(), W.abs(), None) + accumulation_bound(x, W, bias, ref)
    assert_within(p.linear(x, bias), ref, bound)


def test_compressed_tensors_variants_the_kernels_do_not_take_run_the_reference():
    fmt = registry.get("ct-pack")
    asymmetric_int8 = random_ct(256, 64, 8, 0, False)
    int4_per_row = random_ct(512, 64, 4, 0, True)  # one group of 512: not a group size torch's kernel takes
    fp32_scales = dataclasses.replace(random_ct(256, 64, 4, 128, True))
    fp32_scales = dataclasses.replace(fp32_scales, scale=fp32_scales.scale.float())
    for w in (asymmetric_int8, int4_per_row, fp32_scales):
        assert kernels.prepare(fmt, w, torch.bfloat16) is None

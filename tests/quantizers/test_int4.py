"""AWQ-GEMM int4: exact packing, round-to-nearest quality, and byte identity with AutoAWQ 0.2.9."""
import pytest
import torch

from qwen2q.quantizers import int4

GROUP_SIZES = [32, 64, 128]


def random_weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def rtn(weight, group_size):
    return int4.quantize(weight, *int4.compute_scales_zeros(weight, group_size))


def snr_db(reference, approximation):
    return 10 * torch.log10(reference.pow(2).sum() / (reference - approximation).pow(2).sum()).item()


@pytest.fixture(scope="module")
def awq_gemm():
    # Only from_linear and dequantize_gemm are used: pure torch, no Triton needed. Importing awq prints a
    # deprecation notice that it forces through the warning filters itself.
    return pytest.importorskip("awq.modules.linear.gemm")


def test_pack_layout_literal():
    """Columns 0..7 holding 1..8 go to nibbles in column order 0, 2, 4, 6, 1, 3, 5, 7: 0x86427531."""
    codes = torch.arange(1, 9, dtype=torch.uint8)[None, :]
    packed = int4.pack(codes)
    assert packed.dtype == torch.int32 and packed.tolist() == [[0x86427531 - 2**32]]
    assert torch.equal(int4.unpack(packed), codes)


def test_unpack_pack_round_trip_every_half_word():
    """Every 16-bit pattern in the low half and in the high half (sign bit included) of an int32."""
    patterns = torch.arange(2**16, dtype=torch.int64)
    words = torch.cat([patterns, patterns << 16])
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(-1, 4)
    codes = int4.unpack(words)
    assert codes.shape == (2**15, 32) and codes.dtype == torch.uint8 and int(codes.max()) == 15
    assert torch.equal(int4.pack(codes), words)


def test_pack_unpack_round_trip_random_codes():
    codes = torch.randint(0, 16, (64, 96), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert torch.equal(int4.unpack(int4.pack(codes)), codes)


@pytest.mark.parametrize("codes", [torch.full((2, 8), 16), torch.zeros(2, 12, dtype=torch.int32), torch.zeros(2, 8)])
def test_pack_rejects_bad_codes(codes):
    with pytest.raises(ValueError, match="codes"):
        int4.pack(codes)


def test_hand_worked_group():
    """A group spanning [-1, 2]: scale = fp16(3 / 15) = 0.199951171875, zero = round(1 / scale) = 5."""
    weight = torch.linspace(-1, 2, 32)[None, :].repeat(8, 1)
    scales, zeros = int4.compute_scales_zeros(weight, 32)
    assert scales.dtype == torch.float16 and scales.shape == (1, 8)
    assert scales[0, 0].item() == 0.199951171875 and zeros.tolist() == [[5] * 8]
    codes = int4.unpack(int4.quantize(weight, scales, zeros).qweight)
    assert codes[0, 0] == 0 and codes[-1, 0] == 15  # -1 -> 0, 2 -> 15


@pytest.mark.parametrize("group_size, min_snr", [(32, 21.5), (64, 20.5), (128, 19.5)])
def test_round_to_nearest_quality(group_size, min_snr):
    """Gaussian weights: SNR near the 4-bit uniform ideal, and no element off by more than half a step."""
    weight = random_weight((128, 512))
    q = rtn(weight, group_size)
    approximation = int4.dequantize(q, torch.float32)
    assert snr_db(weight, approximation) > min_snr
    steps = q.scales.float().repeat_interleave(group_size, dim=0).t()
    assert ((weight - approximation).abs() <= 0.51 * steps).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_matches_autoawq_from_linear(awq_gemm, group_size, dtype):
    """AutoAWQ packs the weight it has already fake-quantized; given our dequantized weight and our scales
    and zeros, WQLinear_GEMM.from_linear must produce our qweight, qzeros and scales exactly.
    (from_linear sizes its output as out_features // 32 * 4 columns, so it needs out_features % 32 == 0.)"""
    weight = random_weight((96, 256), dtype)
    scales, zeros = int4.compute_scales_zeros(weight, group_size)
    q = int4.quantize(weight, scales, zeros)
    linear = torch.nn.Linear(256, 96, bias=False, dtype=torch.float16)
    linear.weight.data = int4.dequantize(q, torch.float16)
    theirs = awq_gemm.WQLinear_GEMM.from_linear(
        linear, w_bit=4, group_size=group_size, init_only=False, scales=scales, zeros=zeros.half()
    )
    for name in ("qweight", "qzeros", "scales"):
        mine, expected = getattr(q, name), getattr(theirs, name)
        assert mine.dtype == expected.dtype and torch.equal(mine, expected), name


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_dequantize_matches_autoawq(awq_gemm, group_size):
    from awq.utils.packing_utils import dequantize_gemm

    q = rtn(random_weight((48, 256), torch.bfloat16), group_size)
    expected = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, group_size).t()
    assert torch.equal(int4.dequantize(q, torch.float16), expected)


def test_state_dict_round_trip():
    q = rtn(random_weight((16, 128)), 64)
    tensors = int4.to_state_dict(q, "layer")
    assert tensors.keys() == {"layer.qweight", "layer.qzeros", "layer.scales"}
    back = int4.from_state_dict(tensors, "layer")
    assert (back.in_features, back.out_features, back.group_size) == (128, 16, 64)
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(back, name), getattr(q, name))


@pytest.mark.parametrize(
    "key, value",
    [("layer.scales", torch.ones(2, 16)), ("layer.qzeros", torch.zeros(3, 2, dtype=torch.int32))],
)
def test_from_state_dict_rejects_tensors_that_do_not_fit(key, value):
    tensors = int4.to_state_dict(rtn(random_weight((16, 128)), 64), "layer")
    tensors[key] = value
    with pytest.raises(ValueError, match="do not fit"):
        int4.from_state_dict(tensors, "layer")


@pytest.mark.parametrize(
    "in_features, out_features, group_size, message",
    [
        (96, 16, 128, "in_features=96 is not a multiple of group_size=128; group sizes that divide it: \\[32\\]"),
        (100, 16, 32, "in_features=100 .* pad it to a multiple of 32"),
        (128, 12, 128, "out_features=12 is not a multiple of 8 .* pad it to 16"),
        (128, 16, 48, "group_size=48 is not supported"),
    ],
)
def test_check_shape_names_sizes_and_remedy(in_features, out_features, group_size, message):
    with pytest.raises(ValueError, match=message):
        int4.check_shape(in_features, out_features, group_size)
    with pytest.raises(ValueError, match=message):
        int4.compute_scales_zeros(torch.zeros(out_features, in_features), group_size)


def test_check_shape_accepts_qwen2_sizes():
    for in_features, out_features in [(896, 4864), (4864, 896), (3584, 18944), (29568, 8192)]:
        int4.check_shape(in_features, out_features, 128)


def test_quantize_rejects_bad_scales_and_zeros():
    weight = random_weight((16, 128))
    scales, zeros = int4.compute_scales_zeros(weight, 64)
    with pytest.raises(ValueError, match="zeros must be whole numbers in 0..15"):
        int4.quantize(weight, scales, zeros.float() + 16)
    with pytest.raises(ValueError, match="zeros must be whole numbers in 0..15"):
        int4.quantize(weight, scales, zeros.float() + 0.5)
    with pytest.raises(ValueError, match="positive and finite"):
        int4.quantize(weight, -scales, zeros)
    with pytest.raises(ValueError, match="scales and zeros must both be"):
        int4.quantize(weight, scales.t(), zeros.t())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_nan_and_inf(bad):
    weight = random_weight((16, 128))
    weight[3, 9] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        int4.compute_scales_zeros(weight, 128)
    scales, zeros = torch.ones(1, 16, dtype=torch.float16), torch.zeros(1, 16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        int4.quantize(weight, scales, zeros)


@pytest.mark.parametrize("group_size", [32, 128])
def test_fake_quantize_equals_quantize_then_dequantize(group_size):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4), dtype=torch.float32) * 0.05
    w[3, 7] = 0.9  # an outlier in one group
    scales, zeros = int4.compute_scales_zeros(w, group_size)
    ref = int4.dequantize(int4.quantize(w, scales, zeros), torch.float32)
    assert torch.equal(int4.fake_quantize(w, group_size), ref)

"""Per-row int8, checked byte for byte against bitsandbytes' int8_vectorwise_quant and Linear8bitLt."""
import pytest
import torch

from qwen2q.quantizers import int8

SHAPES = [(64, 200), (1, 1), (3, 4096),
          (300, 4096)]  # three blocks of int8._BLOCK_VALUES on CPU, the last one partial
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[::31] *= 10
    return w.to(dtype)


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes(bnb, shape, dtype):
    weight = random_weight(shape, dtype)
    qweight, absmax, _ = bnb.functional.int8_vectorwise_quant(weight)
    q = int8.quantize(weight)
    assert q.qweight.dtype == torch.int8 and q.absmax.dtype == torch.float32
    assert torch.equal(q.qweight, qweight)
    assert torch.equal(q.absmax, absmax)


def test_hand_worked_row_rounds_half_to_even():
    q = int8.quantize(torch.tensor([[1.0, -0.5, 0.25, 0.0]]))
    assert q.qweight.tolist() == [[127, -64, 32, 0]]  # -63.5 -> -64, 31.75 -> 32
    assert q.absmax.tolist() == [1.0]


def test_zero_row_gives_zero_codes():
    weight = random_weight((4, 64), torch.float32)
    weight[2] = 0
    q = int8.quantize(weight)
    assert q.absmax[2] == 0 and not q.qweight[2].any()
    assert not int8.dequantize(q, torch.float32)[2].any()


def test_dequantize_matches_bitsandbytes(bnb):
    """bitsandbytes computes (q * absmax) * (1/127) and we compute q * (absmax / 127): 1-2 fp32 roundings apart."""
    weight = random_weight((64, 200), torch.bfloat16)
    q = int8.quantize(weight)
    expected = bnb.functional.int8_vectorwise_dequant(q.qweight, q.absmax)
    torch.testing.assert_close(int8.dequantize(q, torch.float32), expected, rtol=4e-7, atol=0)
    assert int8.dequantize(q, torch.bfloat16).dtype == torch.bfloat16


def test_state_dict_matches_linear8bitlt(bnb):
    weight = random_weight((16, 64), torch.float16)
    linear = bnb.nn.Linear8bitLt(64, 16, bias=False, has_fp16_weights=False)
    linear.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    theirs = {f"layer.{k}": v for k, v in linear.to("cpu").state_dict().items()}
    mine = int8.to_state_dict(int8.quantize(weight), "layer")
    assert mine.keys() == theirs.keys() == {"layer.weight", "layer.SCB", "layer.weight_format"}
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key])


def test_state_dict_round_trip():
    q = int8.quantize(random_weight((8, 32), torch.bfloat16))
    tensors = int8.to_state_dict(q, "layer")
    back = int8.from_state_dict(tensors, "layer")
    assert torch.equal(back.qweight, q.qweight) and torch.equal(back.absmax, q.absmax)
    del tensors["layer.weight_format"]  # older files may lack it: row-major is the default
    assert torch.equal(int8.from_state_dict(tensors, "layer").qweight, q.qweight)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("layer.weight_format", torch.tensor(3, dtype=torch.uint8), "weight_format=3"),
        ("layer.SCB", torch.ones(7), "SCB must be float32 \\[8\\]"),
        ("layer.weight", torch.zeros(8, 32, dtype=torch.uint8), "weight must be int8"),
    ],
)
def test_from_state_dict_rejects_bad_tensors(key, value, message):
    tensors = int8.to_state_dict(int8.quantize(random_weight((8, 32), torch.float32)), "layer")
    tensors[key] = value
    with pytest.raises(ValueError, match=message):
        int8.from_state_dict(tensors, "layer")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_nan_and_inf(bad):
    weight = random_weight((4, 64), torch.float16)
    weight[1, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        int8.quantize(weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_nan_and_inf_in_a_later_block(bad):
    weight = random_weight((300, 4096), torch.bfloat16)
    assert 299 * 4096 > int8._BLOCK_VALUES  # the last row is in another block than the first
    weight[299, 4095] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        int8.quantize(weight)


@pytest.mark.parametrize("weight", [torch.zeros(64), torch.zeros(2, 64, dtype=torch.int8)])
def test_rejects_non_float_or_non_2d(weight):
    with pytest.raises(ValueError, match="weight"):
        int8.quantize(weight)

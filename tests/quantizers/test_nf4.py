"""NF4 with double quantization, checked byte for byte against bitsandbytes (the format's owner)."""
import json

import pytest
import torch

from qwen2q.quantizers import nf4

# (96, 200): 300 blocks, so the second nested block is partial; (7, 75): odd numel, partial last block.
SHAPES = [(128, 256), (96, 200), (7, 75), (1, 64), (1, 1)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[::97] *= 8  # outliers spread the block absmax values, as in real checkpoints
    return w.to(dtype)


def special_weights():
    """Weights that hit the edge cases of both quantization levels."""
    zero_rows = random_weight((8, 128), torch.float32)
    zero_rows[::3] = 0  # blocks with absmax 0
    zero_tail = random_weight((3, 70), torch.float32)
    zero_tail.view(-1)[192:] = 0  # an all-zero partial last block
    nearly_constant = torch.full((4, 128), 0.5)
    nearly_constant[0, 0] = 0.75
    nearly_constant[1, :64] = 0.25  # block absmax 0.75, 0.5, 0.25, 0.5, ...: most centered values are exactly 0
    return {
        "zero rows": zero_rows,
        "zero tail": zero_tail,
        "constant": torch.full((4, 128), 0.5),  # every absmax equals the offset: nested absmax 0
        "nearly constant": nearly_constant,
        "all zero": torch.zeros(3, 30),  # bitsandbytes stores the partial block's absmax clamped to 1e-38
        "large": random_weight((16, 64), torch.float32) * 1e4,
    }


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


def bnb_quantize(bnb, weight):
    return bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)


def assert_identical(mine, theirs):
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
    assert torch.equal(mine, theirs)


def assert_matches_bitsandbytes(bnb, weight):
    q = nf4.quantize(weight)
    packed, state = bnb_quantize(bnb, weight)
    assert_identical(q.packed, packed)
    assert_identical(q.absmax, state.absmax)
    assert_identical(q.nested_absmax, state.state2.absmax)
    assert q.offset == state.offset.item()
    assert (q.shape, q.dtype) == (tuple(weight.shape), weight.dtype)


def test_dynamic_map_matches_bitsandbytes(bnb):
    assert_identical(nf4.dynamic_map(), bnb.functional.create_dynamic_map(signed=True))


def test_nf4_levels_match_bitsandbytes(bnb):
    assert_identical(nf4.NF4_LEVELS, bnb.functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes(bnb, shape, dtype):
    assert_matches_bitsandbytes(bnb, random_weight(shape, dtype))


@pytest.mark.parametrize("name", special_weights())
def test_quantize_edge_cases_match_bitsandbytes(bnb, name):
    assert_matches_bitsandbytes(bnb, special_weights()[name])


def test_hand_worked_block():
    """One partial block: codes of 1, -1, 0 and 0.5 are 15, 0, 7 and 12 (0.5 is below the 0.4407|0.5626 midpoint)."""
    q = nf4.quantize(torch.tensor([[1.0, -1.0, 0.0, 0.5]]))
    assert q.packed.flatten().tolist() == [0xF0, 0x7C]  # high nibble first
    expected = torch.tensor([[1.0, -1.0, 0.0, 0.44070982933044434]])
    assert torch.equal(nf4.dequantize(q), expected)


def test_partial_block_divides_like_bitsandbytes(bnb):
    """x / 3 and x * (1 / 3) fall on either side of the NF4 midpoint between codes 7 and 8; bitsandbytes
    multiplies by the reciprocal in whole blocks and divides in the partial last block."""
    x = 0.11937045305967331
    weight = torch.tensor([[3.0, x] + [0.0] * 62 + [3.0, x]])
    q = nf4.quantize(weight)
    assert q.packed.flatten().tolist()[0] == 0xF8 and q.packed.flatten().tolist()[-1] == 0xF7
    assert_matches_bitsandbytes(bnb, weight)


def test_odd_numel_pads_with_the_code_for_zero():
    q = nf4.quantize(torch.tensor([[1.0, 1.0, 1.0]]))
    assert q.packed.flatten().tolist() == [0xFF, 0xF7]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_bitsandbytes(bnb, shape, dtype):
    # Compared before any bitsandbytes forward, which repacks the weight in place on AVX512-BF16 CPUs.
    # Shapes with in_features % 64 != 0 but % 16 == 0 are avoided: bitsandbytes 0.50's AVX512
    # dequantize reads the wrong absmax for them.
    weight = random_weight(shape, dtype)
    packed, state = bnb_quantize(bnb, weight)
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes compiles its fallback per shape: slow
        expected = bnb.functional.dequantize_4bit(packed, state)
        state.dtype = torch.float32
        expected_fp32 = bnb.functional.dequantize_4bit(packed, state)
    q = nf4.quantize(weight)
    assert_identical(nf4.dequantize(q), expected)
    assert_identical(nf4.dequantize(q, torch.float32), expected_fp32)


def test_decode_absmax_matches_bitsandbytes(bnb):
    weight = random_weight((96, 200), torch.bfloat16)
    _, state = bnb_quantize(bnb, weight)
    expected = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert_identical(nf4.decode_absmax(nf4.quantize(weight)), expected)


def test_state_dict_matches_linear4bit(bnb):
    """The six tensors equal what bitsandbytes' Linear4bit saves (and transformers writes to safetensors)."""
    weight = random_weight((16, 128), torch.bfloat16)
    linear = bnb.nn.Linear4bit(128, 16, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
    )
    theirs = {f"layer.{k}": v for k, v in linear.to("cpu").state_dict().items()}
    mine = nf4.to_state_dict(nf4.quantize(weight), "layer")
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert_identical(mine[key], theirs[key])


def test_bitsandbytes_reads_our_state_dict(bnb):
    weight = random_weight((7, 75), torch.float16)
    q = nf4.quantize(weight)
    tensors = nf4.to_state_dict(q, "layer")
    packed = tensors.pop("layer.weight")
    state = bnb.functional.QuantState.from_dict({k.removeprefix("layer.weight."): v for k, v in tensors.items()}, "cpu")
    with torch.compiler.set_stance("force_eager"):
        assert_identical(bnb.functional.dequantize_4bit(packed, state), nf4.dequantize(q))


@pytest.mark.parametrize("shape", [(96, 200), (7, 75)])
def test_state_dict_round_trip(shape):
    q = nf4.quantize(random_weight(shape, torch.bfloat16))
    back = nf4.from_state_dict(nf4.to_state_dict(q, "layer"), "layer")
    assert (back.shape, back.dtype, back.offset) == (q.shape, q.dtype, q.offset)
    for field in ("packed", "absmax", "nested_absmax"):
        assert_identical(getattr(back, field), getattr(q, field))


def _tamper_quant_state(tensors, **changes):
    key = "layer.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key].tolist()))
    state.update(changes)
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def _old_cpu_nested_map(tensors):
    # bitsandbytes' old CPU quantizer overwrote code[0] with -1.0 in the shared map before saving it.
    tensors["layer.weight.nested_quant_map"][0] = -1.0


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda t: _tamper_quant_state(t, blocksize=128), "blocksize=128"),
        (lambda t: _tamper_quant_state(t, quant_type="fp4"), "quant_type='fp4'"),
        (lambda t: _tamper_quant_state(t, dtype="int8"), "dtype 'int8'"),
        (lambda t: _tamper_quant_state(t, shape=[8, 64]), "shape \\[8, 64\\] needs"),
        (_old_cpu_nested_map, "nested_quant_map"),
        (lambda t: t["layer.weight.quant_map"].mul_(2), "quant_map"),
    ],
)
def test_from_state_dict_rejects_what_it_cannot_decode(tamper, message):
    tensors = nf4.to_state_dict(nf4.quantize(random_weight((16, 64), torch.float32)), "layer")
    tamper(tensors)
    with pytest.raises(ValueError, match=message):
        nf4.from_state_dict(tensors, "layer")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_nan_and_inf(bad):
    weight = random_weight((4, 64), torch.bfloat16)
    weight[2, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize(weight)


@pytest.mark.parametrize("weight", [torch.zeros(64), torch.zeros(2, 64, dtype=torch.int32), torch.zeros(0, 64)])
def test_rejects_non_float_or_non_2d(weight):
    with pytest.raises(ValueError, match="weight"):
        nf4.quantize(weight)

"""compressed-tensors pack-quantized weights against the compressed-tensors package itself (the oracle:
its packing, its min-max quantization parameters and its decompressor), and against transformers."""
import json

import pytest
import torch

from conftest import make_hf_checkpoint
from qwen2q.qconfig import QuantConfig
from qwen2q.quantization import quantize
from qwen2q.quantizers import ct_pack

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

FMT = ct_pack.FORMAT
CASES = [(4, 128, False), (4, 32, True), (4, 0, False), (8, 0, True), (8, 64, False)]  # 0: channel strategy


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_packing(bits):
    g = torch.Generator().manual_seed(bits)
    lo, hi = ct_pack._limits(bits)
    codes = torch.randint(lo, hi + 1, (24, 64), generator=g, dtype=torch.int8)
    ours = ct_pack.pack(codes, bits)
    assert torch.equal(ours, pack_to_int32(codes, bits))
    assert torch.equal(ct_pack.unpack(ours, bits), codes)
    assert torch.equal(ct_pack.pack(codes.t().contiguous(), bits).t(), pack_to_int32(codes, bits, packed_dim=0))
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size([24, 64])), codes)


def _scheme(params) -> QuantizationScheme:
    group = FMT.to_config(params, ["lm_head"], "bfloat16")["config_groups"]["group_0"]
    return QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})


@pytest.mark.parametrize("bits, group_size, symmetric", CASES)
def test_round_to_nearest_and_storage_match_compressed_tensors(bits, group_size, symmetric):
    params = FMT.params(bits=bits, group_size=group_size, symmetric=symmetric)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits + group_size)) * 0.05
    w[0, :7] += 0.4  # a row whose range is lopsided, so the zero point matters
    q = FMT.quantize(w, params)
    scheme = _scheme(params)
    g = group_size or 256
    groups = w.view(32, -1, g)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    # compressed-tensors keeps fp32 scales until saving; ours are rounded to fp16 (the stored dtype) first,
    # so the oracle's codes are taken on our stored scale: the grid choice itself must match to fp16 rounding
    torch.testing.assert_close(q.scale.float(), scale.float(), rtol=1e-3, atol=0)
    their_zero = torch.round(zero.float()).clamp(*ct_pack._limits(bits)) if not symmetric else None
    codes = ct_quantize(w, q.scale.float(), their_zero if their_zero is not None else torch.zeros_like(q.scale.float()),
                        scheme.weights, dtype=torch.int8)
    state = {"weight_packed": q.packed, "weight_scale": q.scale, "weight_shape": torch.tensor([32, 256])}
    if not symmetric:
        state["weight_zero_point"] = q.zero
        assert torch.equal(ct_pack.unpack(q.zero.t().contiguous(), bits).t().float(), their_zero)
    assert torch.equal(ct_pack.unpack(q.packed, bits), codes)
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(FMT.dequantize(q, torch.float16), theirs.to(torch.float16))


def test_checkpoint_loads_in_qwen2q_and_transformers(tmp_path):
    make_hf_checkpoint(tmp_path / "src", seed=9)
    for method in ("int4", "int8"):
        quantize(tmp_path / "src", tmp_path / method, QuantConfig(method, group_size=64, layout="compressed-tensors"),
                 progress=False)
    cfg = json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["config_groups"]["group_0"]["weights"]["group_size"] == 64
    import qwen2q
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    ids = torch.arange(1, 60)[None]
    for method in ("int8", "int4"):
        ours = qwen2q.load(tmp_path / method, dtype="float32").model
        assert type(ours.model.layers[0].mlp.up_proj).__name__ == "PackedIntLinear"
        # transformers decompresses into float linears; its asymmetric path needs run_compressed=False (its
        # compressed modules expect unpacked zero points, which compressed-tensors itself never writes)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / method, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
        with torch.no_grad():
            a, b = hf(ids).logits, ours(ids)
        # compressed-tensors dequantizes in the scale's fp16 (a relative 2^-11 per weight), qwen2q in fp32
        assert (a - b).abs().max().item() <= 3e-3 * a.abs().max().item(), method


def test_awq_onto_compressed_tensors_runs_on_its_grid(tmp_path):
    from qwen2q.calibrate.pipeline import CalibrationSettings

    make_hf_checkpoint(tmp_path / "src", seed=10)
    ids = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(3))
    report = quantize(tmp_path / "src", tmp_path / "q", QuantConfig("awq", group_size=32, layout="compressed-tensors"),
                      CalibrationSettings(ids=ids, search_tokens=64), progress=False)
    assert "compressed-tensors" in report.method
    import qwen2q

    model = qwen2q.load(tmp_path / "q", dtype="float32").model
    with torch.no_grad():
        assert torch.isfinite(model(ids[:1])).all()


def test_bad_settings_are_refused():
    from qwen2q.errors import Qwen2qError

    with pytest.raises(Qwen2qError, match="goes with --method"):
        QuantConfig("nf4", layout="compressed-tensors")
    with pytest.raises(ValueError, match="is not supported"):
        FMT.from_config({"quant_method": "compressed-tensors", "config_groups": {"a": {}, "b": {}}})
    with pytest.raises(ValueError, match="not supported"):
        FMT.from_config({"quant_method": "compressed-tensors", "format": "float-quantized",
                         "config_groups": {"g": {"targets": ["Linear"], "weights": {"type": "float"}}}})

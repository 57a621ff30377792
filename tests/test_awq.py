"""AWQ: folding is exact, the searches behave, failures are named, and calibration beats round-to-nearest."""
import pytest
import torch

from conftest import make_hf_checkpoint, shared_data
from qwen2q.architecture import LINEARS
from qwen2q.architecture import SCALE_GROUPS as QWEN2_GROUPS
from qwen2q.calibrate.awq import fold_scales, search_clip, search_scales
from qwen2q.calibrate.pipeline import (
    COMPUTE_DTYPES,
    HOOKED,
    CalibrationSettings,
    calibrate_layer,
    capture,
    forward_precision,
    load_layer,
)
from qwen2q.checkpoint import TensorIndex, weight_files
from qwen2q.quantization import quantize as awq_convert
from qwen2q.config import Qwen2Config
from qwen2q.errors import Qwen2qError
from qwen2q.qconfig import QuantConfig
from qwen2q.quantizers import int4
from qwen2q.recipe import Recipe, Rule
from qwen2q.rope import RotaryEmbedding


def _layer(tmp_path, **overrides):
    make_hf_checkpoint(tmp_path, **overrides)
    config = Qwen2Config.from_file(tmp_path / "config.json")
    layer = load_layer(TensorIndex(weight_files(tmp_path)), config, 0, "cpu")
    rotary = RotaryEmbedding(config.rope, config.head_dim)
    cos, sin = rotary(torch.arange(32)[None], torch.float32)
    x = torch.randn(4, 32, config.hidden_size, generator=torch.Generator().manual_seed(0))
    return layer, x, cos, sin


@pytest.mark.parametrize("heads", [2, 4])  # GQA (v -> o not foldable) and MHA (foldable)
def test_folding_any_scales_leaves_the_float_layer_unchanged(tmp_path, heads):
    layer, x, cos, sin = _layer(tmp_path, num_key_value_heads=heads)
    before = layer(x, cos, sin)
    g = torch.Generator().manual_seed(1)
    for group in QWEN2_GROUPS:
        first = layer.get_submodule(group.linears[0])
        prev = layer.get_submodule(group.prev)
        if group.needs_same_shape and prev.out_features != first.in_features:
            continue
        fold_scales(layer, group, torch.rand(first.in_features, generator=g) * 4 + 0.1)
    assert torch.allclose(layer(x, cos, sin), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_calibrated_layer_is_closer_than_round_to_nearest(tmp_path, rounding, compute_dtype):
    layer, x, cos, sin = _layer(tmp_path)
    x[..., 5] *= 20  # an outlier channel, the situation AWQ is for
    reference = layer(x, cos, sin)

    def quantized_error(lay):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            lin = lay.get_submodule(name)
            lin.weight.data = int4.fake_quantize(lin.weight.data, 32)
        return (lay(x, cos, sin) - reference).pow(2).mean().item()

    rtn_error = quantized_error(_layer(tmp_path / "b")[0])
    rule = Rule("*", "awq-gemm", {"group_size": 32}, "awq-gptq" if rounding == "gptq" else "awq")
    choices = {name: Recipe((rule,)).choice_for(f"model.layers.0.{name}") for name in LINEARS}
    _, grids = calibrate_layer(layer, x, cos, sin, choices, search_tokens=64, where="layer 0",
                               compute_dtype=compute_dtype)
    assert bool(grids) == (rounding == "gptq")
    assert quantized_error(layer) < rtn_error


def test_bf16_forwards_keep_fp32_statistics(tmp_path):
    """Under the bf16 forwards the activations are bf16 (what inference computes), but X^T X and mean |x|
    are exact fp32 sums of them: a float64 oracle over the kept inputs agrees to fp32 rounding."""
    layer, x, cos, sin = _layer(tmp_path)
    with forward_precision(x.device, "bfloat16"):
        means, inputs, grams = capture(layer, x, cos, sin, n_search=x.shape[0], grams=True)
    assert inputs["down_in"].dtype == torch.bfloat16  # the MLP's inner activations really were bf16
    for kind in HOOKED:
        kept = inputs[kind].reshape(-1, inputs[kind].shape[-1]).double()
        assert grams[kind].dtype == torch.float32
        torch.testing.assert_close(grams[kind].double(), kept.t() @ kept, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(means[kind].double(), kept.abs().mean(0), rtol=1e-5, atol=1e-6)


def test_compute_dtype_is_bf16_or_fp32_never_fp16(tmp_path):
    with pytest.raises(ValueError, match="compute_dtype"):
        forward_precision(torch.device("cpu"), "float16")
    make_hf_checkpoint(tmp_path / "src")
    with pytest.raises(Qwen2qError, match="float16"):
        awq_convert(tmp_path / "src", tmp_path / "q", QuantConfig("awq", group_size=32),
                    CalibrationSettings(ids=torch.zeros(2, 16, dtype=torch.long), compute_dtype="float16"),
                    progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("native", [True, False])
def test_auto_compute_dtype_runs_bf16_only_where_bf16_matmuls_are_native(tmp_path, monkeypatch, native):
    """The default "auto" writes the very bytes of the explicit dtype it stands for on this kind of device
    (bf16 forwards where bf16 matmuls are native, fp32 elsewhere) and records that dtype, never "auto"."""
    import json

    from qwen2q.calibrate import pipeline
    from safetensors.torch import load_file

    monkeypatch.setattr(pipeline, "native_bf16", lambda device: native)
    make_hf_checkpoint(tmp_path / "src", seed=3)
    ids = torch.randint(0, 200, (3, 32), generator=torch.Generator().manual_seed(0))
    written = {}
    for dtype in ("auto", "bfloat16", "float32"):
        awq_convert(tmp_path / "src", tmp_path / dtype, QuantConfig("awq", group_size=32),
                    CalibrationSettings(ids=ids, search_tokens=64, compute_dtype=dtype), progress=False)
        written[dtype] = load_file(tmp_path / dtype / "model.safetensors")
        note = json.loads((tmp_path / dtype / "config.json").read_text())["qwen2q"]
        assert note["compute_dtype"] == (("bfloat16" if native else "float32") if dtype == "auto" else dtype)
    same, other = ("bfloat16", "float32") if native else ("float32", "bfloat16")
    assert all(torch.equal(written["auto"][n], written[same][n]) for n in written[same])
    assert any(not torch.equal(written["auto"][n], written[other][n]) for n in written[other])


def test_clip_bounds_never_exceed_the_weight_range():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g)
    bound = search_clip(w, torch.randn(100, 64, generator=g), 32, lambda w: int4.fake_quantize(w, 32))
    assert bound.shape == (16, 2, 1)
    assert (bound <= w.abs().view(16, 2, 32).amax(-1, keepdim=True)).all()
    assert (bound >= 0.55 * w.abs().view(16, 2, 32).amax(-1, keepdim=True) - 1e-6).all()


def test_non_finite_activations_stop_with_the_layer_named(tmp_path):
    layer, x, cos, sin = _layer(tmp_path)
    group = QWEN2_GROUPS[2]
    inputs = torch.full((8, layer.mlp.gate_proj.in_features), float("nan"))
    x_mean = torch.ones(layer.mlp.gate_proj.in_features)
    with pytest.raises(Qwen2qError, match="layer 7.*gate_proj"):
        search_scales(layer, group, x_mean, inputs, layer.mlp, 32, "layer 7", lambda w: int4.fake_quantize(w, 32))


def test_group_size_must_divide_every_linear(tmp_path):
    make_hf_checkpoint(tmp_path / "src", intermediate_size=96)
    with pytest.raises(Qwen2qError, match="down_proj.*96"):
        awq_convert(tmp_path / "src", tmp_path / "q", QuantConfig("awq", group_size=64),
                    CalibrationSettings(source=str(tmp_path / "src" / "tokenizer.json"), samples=1, seq_len=8))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("feed, rounding", [("quantized", "nearest"), ("float", "nearest"), ("quantized", None)])
def test_awq_checkpoint_loads_and_records_calibration(tmp_path, feed, rounding):
    import json

    from qwen2q.loader import load_model

    make_hf_checkpoint(tmp_path / "src", seed=5)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    report = awq_convert(tmp_path / "src", tmp_path / "q", QuantConfig("awq", group_size=32),
                                  CalibrationSettings(str(text), samples=4, seq_len=64, search_tokens=128, feed=feed,
                                                      rounding=rounding),
                                  progress=False)
    details = vars(report)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq" and cfg["qwen2q"]["method"] == "awq"
    assert "4 x 64 tokens" in cfg["qwen2q"]["calibration"]
    assert len(details["alphas"]) == 2 and report.bits_per_weight < 5
    assert cfg["qwen2q"]["rounding"] == (rounding or "gptq")  # GPTQ rounding is the default
    assert cfg["qwen2q"]["compute_dtype"] in COMPUTE_DTYPES  # "auto" is recorded as what it ran
    model = load_model(tmp_path / "q", dtype="float32")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Int4Linear"
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(40)[None])).all()


@pytest.mark.slow
def test_awq_beats_round_to_nearest_on_the_embedded_model(tmp_path):
    """The CI guard for calibration: on a trained model (the embedded one), AWQ int4 g128 drifts less than
    round-to-nearest int4 g128 in both KL and perplexity delta."""
    from qwen2q.api import DEFAULT_MODEL
    from qwen2q.quantization import quantize as convert
    from qwen2q.evals.data import load_text
    from qwen2q.evals.harness import evaluate

    data = shared_data()
    if data is None or not (data / "calib" / "wiki.utf8").is_file():
        pytest.skip("calibration text ../shared/data/calib/wiki.utf8 (or QWEN2Q_DATA) not found")
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("the embedded model is not present")
    convert(DEFAULT_MODEL, tmp_path / "rtn", QuantConfig("int4", group_size=128), progress=False)
    awq_convert(DEFAULT_MODEL, tmp_path / "awq", QuantConfig("awq", group_size=128),
                CalibrationSettings(str(data / "calib" / "wiki.utf8"), samples=48, seq_len=512),
                progress=False)
    # The closing note's protocol: 48 x 512 calibration tokens, 32 windows (16k scored tokens); on 8
    # windows the perplexity delta of a model this small is noise-dominated (KL is not).
    result = evaluate([tmp_path / "rtn", tmp_path / "awq"], load_text("auto"), reference=DEFAULT_MODEL,
                      max_windows=32, progress=False)
    rtn, awq = result["rows"][1], result["rows"][2]
    print(f"\nRTN KL {rtn['kl']:.5f} delta {rtn['ppl_delta']:+.3f}; AWQ KL {awq['kl']:.5f} delta {awq['ppl_delta']:+.3f}")
    assert awq["kl"] < rtn["kl"]
    assert abs(awq["ppl_delta"]) < abs(rtn["ppl_delta"])


def test_nf4_with_awq_scales_is_a_plain_nf4_checkpoint_closer_than_nf4(tmp_path):
    """--method nf4 --awq-scales: the scales fold into the norms and up_proj, so the file is ordinary NF4
    (qwen2q's NF4 modules load it), and on calibration-like inputs the layer drifts less than plain NF4."""
    import json

    from qwen2q.quantization import quantize as convert
    from qwen2q.loader import load_model

    make_hf_checkpoint(tmp_path / "src", seed=6)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    calib = CalibrationSettings(str(text), samples=4, seq_len=64, search_tokens=128)
    awq_convert(tmp_path / "src", tmp_path / "q", QuantConfig("nf4"), calib, progress=False)
    convert(tmp_path / "src", tmp_path / "plain", QuantConfig("nf4"), progress=False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and cfg["qwen2q"]["awq_scales"] is True
    ref, scaled, plain = (load_model(tmp_path / d, dtype="float32") for d in ("src", "q", "plain"))
    assert type(scaled.model.layers[0].mlp.up_proj).__name__ == "NF4Linear"
    ids = torch.tensor([[0] + list(range(3, 60))])  # tokens the calibration text is made of, and others
    with torch.no_grad():
        want = torch.log_softmax(ref(ids), -1)
        kl = [torch.nn.functional.kl_div(torch.log_softmax(m(ids), -1), want, log_target=True, reduction="sum").item()
              for m in (scaled, plain)]
    assert kl[0] < kl[1]
    with pytest.raises(Qwen2qError, match="gptq"):
        awq_convert(tmp_path / "src", tmp_path / "q2", QuantConfig("nf4"),
                    CalibrationSettings(str(text), samples=2, seq_len=32, rounding="gptq"), progress=False)

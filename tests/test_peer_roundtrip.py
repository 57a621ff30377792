"""Checkpoints cross between qwen2q and the peers: transformers + bitsandbytes, and AutoAWQ.

Exactness is checked on the weights: each linear dequantized by bitsandbytes equals qwen2q's
dequantization bit for bit.  Logits: NF4 agrees to 1e-4 (fp32) once bitsandbytes' CPU fast path is
switched off (on CPUs with AVX512-BF16 its first forward repacks the weight and rounds absmax to bf16,
a ~1% approximation that its GPU path does not make).  int8 agrees to 3% relative: bitsandbytes runs
LLM.int8 (activations quantized to int8 too, fp16 outlier path), qwen2q runs int8 weight-only.
"""
import warnings

import pytest
import torch

from conftest import make_hf_checkpoint
from qwen2q.quantization import quantize as convert
from qwen2q.loader import load_model
from qwen2q.qconfig import QuantConfig

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    # fp32, because transformers loads a bitsandbytes checkpoint in the dtype its config.json names.
    make_hf_checkpoint(path, dtype=torch.float32, tie_word_embeddings=False, seed=11)
    return path


IDS = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(5))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _hf_load(path, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=dtype).eval()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # exact dequantize + matmul, as on GPU
    return model


def _linears(model):
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj")}


def _same_nf4_weights(ours, hf):
    import bitsandbytes.functional as bnbf

    from qwen2q.quantizers import nf4

    theirs = _linears(hf)
    for name, mine in _linears(ours).items():
        w = theirs[name].weight
        assert torch.equal(bnbf.dequantize_4bit(w.data, w.quant_state), nf4.dequantize(mine.weight_q(), torch.float32))
        assert torch.equal(mine.bias, theirs[name].bias) if mine.bias is not None else theirs[name].bias is None


def test_transformers_loads_our_nf4(src, tmp_path):
    convert(src, tmp_path / "q", QuantConfig("nf4"), progress=False)
    ours, hf = load_model(tmp_path / "q", dtype="float32"), _hf_load(tmp_path / "q", torch.float32)
    _same_nf4_weights(ours, hf)
    with torch.no_grad():
        assert (ours(IDS) - hf(IDS).logits).abs().max().item() <= 1e-4


def test_transformers_loads_our_nf4_with_awq_scales(src, tmp_path):
    """The AWQ scales fold into norms and up_proj: transformers + bitsandbytes still read a plain NF4 file."""
    from qwen2q.calibrate.pipeline import CalibrationSettings
    from qwen2q.quantization import quantize as awq_convert

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Calibration sentence number {i} about foxes and dogs." for i in range(300)))
    awq_convert(src, tmp_path / "q", QuantConfig("nf4"), CalibrationSettings(str(text), samples=2, seq_len=64,
                                                                             search_tokens=64), progress=False)
    ours, hf = load_model(tmp_path / "q", dtype="float32"), _hf_load(tmp_path / "q", torch.float32)
    _same_nf4_weights(ours, hf)
    with torch.no_grad():
        assert (ours(IDS) - hf(IDS).logits).abs().max().item() <= 1e-4


def test_transformers_loads_our_int8(src, tmp_path):
    convert(src, tmp_path / "q", QuantConfig("int8"), progress=False)
    ours, hf = load_model(tmp_path / "q", dtype="float32"), _hf_load(tmp_path / "q", torch.float32)
    _same_int8_weights(ours, hf)
    with torch.no_grad():
        assert _rel(ours(IDS), hf(IDS).logits) < 0.03


def _same_int8_weights(ours, hf):
    theirs = _linears(hf)
    for name, mine in _linears(ours).items():
        assert torch.equal(mine.qweight, theirs[name].weight.data)
        assert torch.equal(mine.absmax, theirs[name].weight.SCB)


def _hf_quantize(src, dst, **bnb):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(src, device_map="cpu", dtype=torch.float32,
                                                 quantization_config=BitsAndBytesConfig(**bnb))
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())


def test_we_load_transformers_nf4(src, tmp_path):
    _hf_quantize(src, tmp_path / "q", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    ours, hf = load_model(tmp_path / "q", dtype="float32"), _hf_load(tmp_path / "q", torch.float32)
    assert type(ours.model.layers[0].self_attn.q_proj).__name__ == "NF4Linear"
    _same_nf4_weights(ours, hf)
    with torch.no_grad():
        assert (ours(IDS) - hf(IDS).logits).abs().max().item() <= 1e-4


def test_we_load_transformers_int8(src, tmp_path):
    _hf_quantize(src, tmp_path / "q", load_in_8bit=True)
    ours, hf = load_model(tmp_path / "q", dtype="float32"), _hf_load(tmp_path / "q", torch.float32)
    assert type(ours.model.layers[0].self_attn.q_proj).__name__ == "Int8Linear"
    _same_int8_weights(ours, hf)
    with torch.no_grad():
        assert _rel(ours(IDS), hf(IDS).logits) < 0.03

"""AWQ GEMM int4 checkpoints cross between qwen2q and AutoAWQ 0.2.9 in both directions, on CPU.

1. AutoAWQ's real pipeline quantizes a tiny random Qwen2: `from_pretrained` (fp16, its default), then
   `quantize` (activation-aware scale search and clip search on generated calibration text), then
   `save_quantized`. qwen2q loads the result.
2. qwen2q's `convert(..., QuantConfig("int4"))` writes a checkpoint, and AutoAWQ's `from_quantized`
   loads it. Group sizes 128 and 32, and a `modules_to_not_convert` entry.

In both directions the two loaded models hold the same tensors: qweight/qzeros/scales bit for bit,
the fp16 biases, and the embeddings and norms (which carry AWQ's folded scales). Each quantized linear,
dequantized by AutoAWQ's CPU path (`dequantize_gemm`, which `WQLinear_GEMM.forward` multiplies by
when neither awq_ext nor triton is used), equals qwen2q's dequantization bit for bit in fp16. The
logits agree to within fp16 rounding. The source model has tied embeddings, like Qwen2-0.5B and 1.5B.

AutoAWQ on CPU needs three workarounds:
- `from_quantized` raises ImportError (it wants intel_extension_for_pytorch for its IPEX kernel)
  whenever `get_best_device()` returns "cpu". So while it builds its `WQLinear_GEMM` modules,
  `get_best_device` reports "cuda:0"; inside `from_quantized` that only picks the module class and
  the fusing branch, and fusing is off.
- The modules stay on the CPU through `device_map={"": "cpu"}`, because accelerate refuses the
  string "cpu".
- triton imports fine on CPU-only machines, so AutoAWQ would call its GPU kernel; turning
  `TRITON_AVAILABLE` off makes it dequantize and then call torch.matmul.
It works only with `torch_dtype=float16`. With float32, accelerate casts the fp16 `scales` to fp32
and the forward fails ("expected m1 and m2 to have the same dtype ... Half != float").

Tolerance: AutoAWQ computes everything in fp16 (activations, residual stream, attention, dequantized
weights). The weights are identical, so the logits can differ only by rounding. fp16's unit roundoff
is 2**-11 ~ 4.9e-4, and a two-layer model accumulates a few of those per element. Measured on
2 x 48 tokens: qwen2q in fp32 and in fp16 each differ from AutoAWQ by ~6.7e-4 relative (L2 norm of
the logits), the same as qwen2q-fp16 against qwen2q-fp32 (~6.6e-4), and the top-1 tokens all agree.
The bound is 3e-3 relative (about 6 fp16 roundoffs, 4.5x the measured value). A layout mistake
(nibble order, zeros, transposed scales, a lost bias) moves the logits by O(1), and the exact weight
checks already name the tensor.

transformers 5.23 cannot be a third reader here: it loads AWQ checkpoints only through gptqmodel
("Loading an AWQ quantized model requires gptqmodel"), which is not installed.
"""
import contextlib
import json
import random

import pytest
import torch

from conftest import make_hf_checkpoint
from qwen2q.quantization import quantize as convert
from qwen2q.loader import load_model
from qwen2q.qconfig import QuantConfig
from qwen2q.quantizers import int4

pytest.importorskip("awq")  # importing it resets the warning filters; harmless here
pytest.importorskip("accelerate")

IDS = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(5))
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm"}
TOLERANCE = 3e-3  # relative L2 error of the logits; see the module docstring


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random Qwen2 in bf16 (as Qwen2 ships), tied like Qwen2-0.5B/1.5B, GQA, random q/k/v biases."""
    path = tmp_path_factory.mktemp("src")
    make_hf_checkpoint(path, dtype=torch.bfloat16, tie_word_embeddings=True, seed=21)
    return path


def _calibration_text(n=4, words=10):
    rng = random.Random(0)
    vocab = "the quick brown fox jumps over a lazy dog def square x return y * print while for".split()
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


@pytest.fixture(scope="module")
def autoawq_dir(src, tmp_path_factory):
    """AutoAWQ's own quantization of `src` (group size 64, default config), saved as its users save it."""
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    dst = tmp_path_factory.mktemp("autoawq")
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoAWQForCausalLM.from_pretrained(str(src), device_map="cpu", torch_dtype=torch.float16)
    # AutoAWQ drops calibration lines longer than max_calib_seq_len, joins the rest and cuts them into
    # blocks of that length: 4 short lines (~90 tokens) give one block of 64 tokens. That runs the whole
    # scale and clip search in a few seconds on CPU (the clip search in fp16 dominates).
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"},
                   calib_data=_calibration_text(), max_calib_seq_len=64, max_calib_samples=4)
    model.save_quantized(str(dst))
    tokenizer.save_pretrained(dst)
    return dst


@contextlib.contextmanager
def _autoawq_on_cpu():
    """AutoAWQ's CPU code paths: no triton kernel, and no IPEX requirement while loading (see module doc)."""
    import awq.models.base
    import awq.modules.linear.gemm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(awq.modules.linear.gemm, "TRITON_AVAILABLE", False)
        mp.setattr(awq.models.base, "get_best_device", lambda: "cuda:0")
        yield


def _autoawq_load(path):
    from awq import AutoAWQForCausalLM

    with _autoawq_on_cpu():
        return AutoAWQForCausalLM.from_quantized(str(path), device_map={"": "cpu"}, torch_dtype=torch.float16,
                                                 fuse_layers=False)


def _autoawq_logits(model):
    with _autoawq_on_cpu(), torch.no_grad():
        return model(IDS).logits


def _same_weights(ours, theirs):
    """Check that the two models hold the same tensors and that AutoAWQ's CPU dequantization of every
    WQLinear_GEMM equals qwen2q's bit for bit in fp16. Return how many linears are int4."""
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    mine = {n: t for n, t in ours.state_dict().items() if "rotary" not in n}  # computed, never stored
    their = theirs.model.state_dict()
    assert mine.keys() == their.keys()
    for name, t in mine.items():
        assert torch.equal(t.half() if t.is_floating_point() else t, their[name]), name
    quantized = {n: m for n, m in theirs.model.named_modules() if isinstance(m, WQLinear_GEMM)}
    for name, t in quantized.items():
        m = ours.get_submodule(name)
        assert type(m).__name__ == "Int4Linear", name
        w = dequantize_gemm(t.qweight, t.qzeros, t.scales, t.w_bit, t.group_size)  # [in, out] fp16
        assert torch.equal(int4.dequantize(m.weight_q(), torch.float16), w.t()), name
    return len(quantized)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _check(path, n_int4):
    theirs = _autoawq_load(path)
    ours32, ours16 = load_model(path, dtype="float32"), load_model(path, dtype="float16")
    assert _same_weights(ours16, theirs) == n_int4
    ref = _autoawq_logits(theirs)
    assert ref.dtype == torch.float16
    with torch.no_grad():
        for ours in (ours32, ours16):
            logits = ours(IDS)
            assert _rel(logits, ref) < TOLERANCE, logits.dtype
            assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95, logits.dtype


@pytest.mark.slow  # AutoAWQ's quantize: ~5 s of CPU
def test_we_load_autoawq_quantized(autoawq_dir, src):
    cfg = json.loads((autoawq_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {**AWQ_CONFIG, "group_size": 64, "modules_to_not_convert": None}
    # AWQ folded its activation-aware scales into the norms, so this is not round-to-nearest of the source.
    norm = "model.layers.0.input_layernorm.weight"
    folded, plain = load_model(autoawq_dir).state_dict()[norm], load_model(src, dtype="float16").state_dict()[norm]
    assert not torch.equal(folded, plain)
    _check(autoawq_dir, n_int4=7 * 2)


@pytest.mark.parametrize("group_size, skip", [(128, ()), (32, ("o_proj",))])
def test_autoawq_loads_our_int4(src, tmp_path, group_size, skip):
    convert(src, tmp_path / "q", QuantConfig("int4", group_size=group_size, skip=("lm_head", *skip)), progress=False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    expected = {**AWQ_CONFIG, "group_size": group_size, "modules_to_not_convert": list(skip) or None}
    assert cfg["quantization_config"] == expected
    # AutoAWQ skips a linear when an entry is a substring of its name inside the decoder layer
    # ("o_proj" in "self_attn.o_proj"); that o_proj then loads as a plain fp16 nn.Linear.
    _check(tmp_path / "q", n_int4=(7 - len(skip)) * 2)


def test_autoawq_loads_our_calibrated_awq(src, tmp_path):
    """qwen2q's calibrated AWQ (scales folded into the norms and up_proj) runs in AutoAWQ's own forward."""
    from qwen2q.calibrate.pipeline import CalibrationSettings
    from qwen2q.quantization import quantize as awq_convert

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(_calibration_text(n=200, words=12)))
    awq_convert(src, tmp_path / "q", QuantConfig("awq", group_size=64),
                CalibrationSettings(str(text), samples=4, seq_len=64, search_tokens=128), progress=False)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(load_model(tmp_path / "q").state_dict()[norm], load_model(src).state_dict()[norm])
    _check(tmp_path / "q", n_int4=7 * 2)

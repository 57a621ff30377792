"""Opt-in (`pytest -m real`): quantize the real Qwen2.5-Coder-0.5B-Instruct with every method on CPU.

Prints one table (time, peak RSS, size, perplexity and its drift on 32 x 512 tokens of WikiText-2 test)
and checks NF4 against transformers + bitsandbytes on the same windows to 4 significant digits.
"""
import re
import subprocess
import sys

import pytest
import torch

from test_real_model import SEQ_LEN, WINDOWS, real_dir, wikitext_ids  # noqa: F401  (fixtures)

pytestmark = pytest.mark.real


def _ppl(model, ids):
    from qwen2q.evals.perplexity import perplexity

    return perplexity(model, ids, SEQ_LEN, max_windows=WINDOWS, batch_size=1)["ppl"]


def _quantize(src, dst, method):
    r = subprocess.run([sys.executable, "-m", "qwen2q.cli", "quantize", str(src), str(dst), "-m", method],
                       capture_output=True, text=True, cwd="/", timeout=3600)
    assert r.returncode == 0, r.stderr
    fields = dict(re.findall(r"^\s+(time|peak RSS|size after|bits / weight)\s+(.*)$", r.stdout, re.M))
    return fields


@pytest.fixture(scope="module")
def results(real_dir, wikitext_ids, tmp_path_factory):  # noqa: F811
    import qwen2q

    out = tmp_path_factory.mktemp("quantized")
    rows = {"bf16": {"ppl": _ppl(qwen2q.load(real_dir).model, wikitext_ids)}}
    for method in ("nf4", "int8", "int4"):
        fields = _quantize(real_dir, out / method, method)
        fields["ppl"] = _ppl(qwen2q.load(out / method).model, wikitext_ids)
        rows[method] = fields
    base = rows["bf16"]["ppl"]
    print(f"\n{'method':<7}{'ppl':>9}{'delta':>9}  {'size after':<22}{'bits/w':<8}{'time':<9}peak RSS")
    for name, r in rows.items():
        print(f"{name:<7}{r['ppl']:>9.4f}{r['ppl'] - base:>+9.4f}  {r.get('size after', '-')[:20]:<22}"
              f"{r.get('bits / weight', '-')[:6]:<8}{r.get('time', '-'):<9}{r.get('peak RSS', '-')}")
    return rows


def test_every_method_drifts_little(results):
    base = results["bf16"]["ppl"]
    assert results["int8"]["ppl"] / base < 1.01
    assert results["nf4"]["ppl"] / base < 1.15
    assert results["int4"]["ppl"] / base < 1.15


def test_nf4_matches_transformers_bitsandbytes(results, real_dir, wikitext_ids):  # noqa: F811
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.bfloat16, device_map="cpu",
                                              quantization_config=cfg).eval()
    for module in hf.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # bitsandbytes' exact path, as on GPU
    theirs = _ppl(lambda ids: hf(ids).logits, wikitext_ids)
    ours = results["nf4"]["ppl"]
    print(f"\nNF4 ppl: qwen2q {ours:.4f}, transformers + bitsandbytes {theirs:.4f}")
    assert f"{ours:.4g}" == f"{theirs:.4g}"

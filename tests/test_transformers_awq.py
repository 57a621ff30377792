"""transformers 5 (with gptqmodel, its AWQ loader) loads qwen2q's AWQ output on CPU, and its logits match ours.

Opt-in: `-m gptqmodel` with QWEN2Q_GPTQ_PYTHON naming the python of a venv with transformers 5 and gptqmodel
(`dev/qwen2q_dev/research/peers/setup.sh` makes one: PEERS/gptq), e.g.

    QWEN2Q_GPTQ_PYTHON=/work/peers/gptq/bin/python pytest -m gptqmodel tests/test_transformers_awq.py

Tolerance: relative logit error under 1% and top-1 agreement over 95%.  gptqmodel's CPU AWQ module computes
in bf16 from bf16 scales and zero offsets (as qwen2q's own few-row int4 kernel does: at most 2^-8 of each
weight's scale), where qwen2q's exact path rounds each weight once, so the logits differ by bf16 rounding,
not by a misread weight: a wrong nibble order or zero point gives errors of tens of percent.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import qwen2q
from qwen2q.files import DEFAULT_MODEL
from qwen2q.qconfig import QuantConfig
from qwen2q.quantization import quantize

pytestmark = pytest.mark.gptqmodel

SCRIPT = Path(__file__).resolve().parents[1] / "dev/qwen2q_dev/research/peers/tf5_awq_logits.py"
PYTHON = os.environ.get("QWEN2Q_GPTQ_PYTHON")


def test_transformers_5_with_gptqmodel_reads_our_awq_output(tmp_path):
    if not PYTHON or not Path(PYTHON).exists():
        pytest.skip("QWEN2Q_GPTQ_PYTHON does not name a python with transformers 5 and gptqmodel")
    dst = tmp_path / "int4"
    quantize(DEFAULT_MODEL, dst, QuantConfig("int4"), progress=False)
    rows = [list(range(1, 65)), list(range(500, 628))]
    (tmp_path / "ids.json").write_text(json.dumps(rows))
    run = subprocess.run([PYTHON, str(SCRIPT), str(dst), str(tmp_path / "ids.json"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert "Awq" in out["module"], out["module"]  # a quantized module, not a dequantized float copy
    m = qwen2q.load(dst, dtype="bfloat16")
    for row, theirs in zip(rows, out["logits"]):
        with torch.inference_mode():
            ours = m.model(torch.tensor([row]))[0].float()
        error, agree = ((ours - theirs).norm() / theirs.norm()).item(), (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
        print(f"{len(row)} tokens: relative logit error {error:.5f}, top-1 agreement {agree.item():.4f} ({out['module']})")
        assert error < 0.01 and agree.item() > 0.95

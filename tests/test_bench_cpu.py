"""`python dev bench-cpu`: every row (bf16, each format's reference and CPU backend, NF4's bf16 cache) is timed
and reported, per layer and end to end, with ratios against bf16.  Only the report is checked, never a speed."""
import json
import subprocess

import torch

import qwen2q
from conftest import make_hf_checkpoint
from dev_modules import DEV_CLI
from qwen2q.qconfig import QuantConfig


def test_reports_every_row_per_layer_and_end_to_end(tmp_path):
    src = tmp_path / "src"
    make_hf_checkpoint(src, dtype=torch.bfloat16, tie_word_embeddings=True)
    quantized = []
    for method in ("int4", "nf4"):
        quantized.append(tmp_path / method)
        config = QuantConfig(method, group_size=64) if method == "int4" else QuantConfig(method)
        qwen2q.quantize(src, quantized[-1], config, progress=False)
    out = tmp_path / "b.json"
    r = subprocess.run([*DEV_CLI, "bench-cpu", str(src), *map(str, quantized), "--prompt-len", "16", "--new-tokens",
                        "2", "--reference-tokens", "1", "--rounds", "2", "--json", str(out)],
                       capture_output=True, text=True, cwd="/", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    rows = [(res["format"], res["backend"]) for res in result["results"]]
    assert rows == [("bf16", "bf16"), ("int4-g64", "reference"), ("int4-g64", "cpu"), ("nf4", "reference"),
                    ("nf4", "cpu"), ("nf4", "cpu+bf16 cache")]
    bf16 = result["results"][0]
    assert bf16["decode_tok_s_x"] == bf16["prefill_tok_s_x"] == bf16["gate_proj_m16_x"] == 1.0
    for res in result["results"]:
        assert len(res["samples"]["decode_tok_s"]) == 2 and res["decode_tok_s"] > 0
        assert {f"{p}_m{m}" for p in ("q_proj", "k_proj", "gate_proj", "down_proj") for m in (1, 16)} <= res.keys()
    cache = result["results"][-1]
    assert cache["extra_mib"] > result["results"][-2]["extra_mib"] > 0  # the bf16 copy dwarfs the decoded absmax
    assert result["shapes"]["gate_proj"] == [256, 128]
    for line in ("format", "int4-g64", "cpu+bf16 cache", "gate_proj [256, 128]"):
        assert line in r.stdout

"""The one-shot GPU check (`python dev gpu-check`) runs every part on CPU with --dry-run and writes the JSON the
GPU run will write: the script a lent GPU gets must not break there for a reason a CPU could have found."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_part(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "dev", "gpu-check", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_check-cpu-dry-run.json").read_text())
    assert set(data["parts"]) == {"env", "tests", "correct", "graph", "kernels", "e2e", "cli"}
    assert all(part["status"] == "ok" for part in data["parts"].values()), data["parts"]
    assert data["correct"]["cases"] == data["correct"]["planned"] > 10 and data["correct"]["failures"] == []
    assert data["correct"]["split_k_deterministic"] and data["correct"]["custom_op"] == "ok"
    formats = {r["format"] for r in data["kernels"]}
    assert formats == {"int4-g128", "nf4", "int8", "bf16"}
    assert all({"proj", "M", "format", "us"} <= set(r) for r in data["kernels"])
    int4_variants = {(r["M"], r["variant"]) for r in data["kernels"] if r["format"] == "int4-g128"}
    assert {(1, "fixup"), (3, "fixup"), (3, "awq-layout"), (3, "native 64x1w s3"), (3, "native 256x4w s3"),
            (3, "native 128x2w s2"), (512, "native-dequantize"), (1, "no-split")} <= int4_variants  # the first GPU run
    assert {(r["format"], r["variant"]) for r in data["kernels"] if r["M"] == 1} >= {("nf4", "no-split"),
                                                                                   ("int8", "no-split")}
    assert data["correct"]["fixup_equals_reduce"] and "decode_tok_s_fixup" in data["e2e"]["int4"]
    assert set(data["e2e"]) == {"bf16", "int4", "nf4", "int8"}
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in data["e2e"].values())
    assert all(r["graph_equals_eager"] for r in data["parts"]["graph"]["formats"].values())
    assert all("fused_vs_plain_max_abs" in r for r in data["parts"]["graph"]["formats"].values())
    assert all({"decode_tok_s_unfused", "kernels_per_step", "kernels_per_step_unfused"} <= set(data["e2e"][m])
               for m in ("bf16", "int4"))  # what the fused layer steps bring, both ways
    assert data["e2e"]["int4"]["head_int4"]["decode_tok_s"] > 0  # lm_head in int4 as well
    assert {(r["proj"], r["M"], r["format"]) for r in data["kernels"]} >= {("grouped small", 1, "int4-g128"),
                                                                          ("grouped small", 3, "bf16")}
    attention = data["parts"]["kernels"]["attention"]
    assert {(r["S"], r["variant"]) for r in attention} >= {(40, "sdpa"), (40, "kernel"), (600, "kernel 1 splits")}
    assert all(r["max_abs_vs_sdpa"] < 0.05 for r in attention)
    assert data["parts"]["cli"]["failures"] == []
    assert (tmp_path / "gpu_check-cpu-dry-run.log").read_text().count("ok in") == 7

"""The kernel benchmark's logic (correctness gate, table, JSON) on CPU under the Triton interpreter."""
import json
import os
import subprocess

import pytest

from dev_modules import DEV_CLI

pytest.importorskip("triton")


def test_smoke_run_checks_and_writes_every_figure(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([*DEV_CLI, "bench-kernels", "--smoke", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, cwd="/", env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["failures"] == [] and result["gpu"] == "cpu-interpreter"
    assert len(result["rows"]) == 2 * 4
    for row in result["rows"]:
        for fmt in ("int4", "nf4", "int8"):
            assert row[f"{fmt}_rel_err"] < 1e-2
            assert {f"{fmt}_ms", f"{fmt}_gbs", f"{fmt}_tflops", f"{fmt}_speedup", f"{fmt}_bandwidth_fraction"} <= row.keys()


def test_refuses_to_run_without_a_gpu_or_the_interpreter():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine would run the whole benchmark")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([*DEV_CLI, "bench-kernels"], capture_output=True, text=True,
                       cwd="/", env=env, timeout=300)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr

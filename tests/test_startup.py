"""`qwen2q info` and every `--help` import no torch (they read JSON and file headers only), so they
answer in a fraction of a second; the times are measured in the closing notes, not asserted here."""
import subprocess
import sys

import pytest

from conftest import make_hf_checkpoint

PROBE = """
import sys
from qwen2q.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code, file=sys.stderr)
"""


def _run(*args):
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, cwd="/",
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    return r, r.stderr.strip().splitlines()[-1].split()


@pytest.mark.parametrize("command", [[], ["info"], ["generate"], ["chat"], ["quantize"], ["eval"], ["demo"],
                                     ["bench"]])
def test_help_imports_no_torch(command):
    r, (torch, code) = _run(*command, "--help")
    assert code in ("0", "None") and r.stdout.startswith("Usage:"), r.stderr
    assert torch == "NO-TORCH"


def test_info_imports_no_torch_and_refuses_what_would_not_load(tmp_path):
    make_hf_checkpoint(tmp_path / "ok")
    r, (torch, code) = _run("info", tmp_path / "ok")
    assert code in ("0", "None") and "quantization" in r.stdout and torch == "NO-TORCH", r.stderr
    r, (torch, code) = _run("info")  # the embedded model
    assert "5.2 M" in r.stdout and torch == "NO-TORCH"
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "ok" / "model.safetensors").write_bytes(data[: len(data) // 2])
    r, (torch, code) = _run("info", tmp_path / "ok")
    assert code == "1" and "truncated" in r.stderr.splitlines()[0] and r.stderr.startswith("error: ")
    (tmp_path / "ok" / "model.safetensors").rename(tmp_path / "ok" / "pytorch_model.bin")
    r, (torch, code) = _run("info", tmp_path / "ok")
    assert code == "1" and "pickle" in r.stderr.splitlines()[0]

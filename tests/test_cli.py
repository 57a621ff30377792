"""The qwen2q command as a user runs it: a real subprocess, exit codes, one-line errors."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import make_hf_checkpoint


def run(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qwen2q.cli", *args], capture_output=True, text=True,
                          input=stdin, env=env, cwd="/", timeout=300)


def one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0]


def test_info_reports_architecture_and_size(hf_tiny):
    r = run("info", str(hf_tiny[0]))
    assert r.returncode == 0, r.stderr
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.stdout.splitlines())
    assert fields["layers"] == "2"
    assert fields["heads / kv heads / head dim"] == "4 / 2 / 32"
    expected = sum(p.numel() for p in hf_tiny[1].parameters())  # tied: counted once
    assert fields["parameters"] == f"{expected / 1e6:,.1f} M"
    assert fields["quantization"] == "none"


def test_generate_streams_text(hf_tiny):
    r = run("generate", str(hf_tiny[0]), "--prompt", "The quick", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr


def test_chat_reads_stdin(hf_tiny):
    r = run("chat", str(hf_tiny[0]), "--max-new-tokens", "4", stdin="hello\n/exit\n")
    assert r.returncode == 0, r.stderr


def test_missing_directory_is_one_line():
    one_line_error(run("info", "/no/such/model"), "no such directory")


def test_non_qwen2_is_one_line(hf_tiny):
    cfg = json.loads((hf_tiny[0] / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (hf_tiny[0] / "config.json").write_text(json.dumps(cfg))
    one_line_error(run("generate", str(hf_tiny[0]), "-p", "x"), "mistral")


def test_missing_shard_is_one_line(tmp_path):
    make_hf_checkpoint(tmp_path, shard_size="200KB")
    sorted(tmp_path.glob("model-*.safetensors"))[0].unlink()
    one_line_error(run("generate", str(tmp_path), "-p", "x"), "missing")


def test_truncated_file_is_one_line(hf_tiny):
    f = hf_tiny[0] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    one_line_error(run("generate", str(hf_tiny[0]), "-p", "x"), "truncated or corrupt")


@pytest.mark.parametrize("command", ["generate", "chat", "info", "quantize", "eval", "demo", "bench"])
def test_help_has_examples(command):
    r = run(command, "--help")
    assert r.returncode == 0 and "Example" in r.stdout and f"qwen2q {command}" in r.stdout


def test_bench_runs_on_cpu(hf_tiny, tmp_path):
    r = run("bench", str(hf_tiny[0]), "--prompt-len", "8", "--new-tokens", "4", "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["cuda_graph"] is False and result["decode_tokens_per_s"] > 0


def test_awq_scales_needs_nf4_and_gptq_needs_int4(hf_tiny, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("out")
    one_line_error(run("quantize", str(hf_tiny[0]), str(tmp_path / "a"), "-m", "int4", "--awq-scales"),
                   "--awq-scales", "nf4")
    one_line_error(run("quantize", str(hf_tiny[0]), str(tmp_path / "b"), "-m", "nf4", "--awq-scales",
                       "--rounding", "gptq", "--calib-data", str(tmp_path / "none.txt")), "gptq")
    one_line_error(run("quantize", str(hf_tiny[0]), str(tmp_path / "c"), "-m", "awq", "--rounding", "nearest",
                       "--act-order", "--calib-data", str(tmp_path / "none.txt")), "--act-order")
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("act_order", ["--act-order", "--no-act-order"])
def test_quantize_awq_with_gptq_rounding(hf_tiny, tmp_path_factory, act_order):
    tmp_path = tmp_path_factory.mktemp("out")
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Sentence {i} for calibrating a tiny model." for i in range(200)))
    r = run("quantize", str(hf_tiny[0]), str(tmp_path / "q"), "-m", "awq", "--group-size", "32", "--rounding", "gptq",
            act_order, "--calib-data", str(text), "--calib-samples", "2", "--calib-seq-len", "32", "--search-tokens", "32")
    assert r.returncode == 0, r.stderr
    assert "gptq rounding" in r.stdout and "calibration" in r.stdout
    recorded = json.loads((tmp_path / "q" / "config.json").read_text())["qwen2q"]
    assert recorded["rounding"] == "gptq" and recorded["act_order"] == (act_order == "--act-order")


def test_killed_quantize_leaves_nothing_behind(hf_tiny, tmp_path_factory):
    """SIGTERM mid-conversion (a scheduler's kill) cleans up like Ctrl-C: no DST, no hidden partial folder."""
    import signal
    import time

    out = tmp_path_factory.mktemp("out")
    text = out / "calib.txt"
    text.write_text("\n\n".join(f"Sentence {i} for calibrating a tiny model." for i in range(3000)))
    proc = subprocess.Popen([sys.executable, "-m", "qwen2q.cli", "quantize", str(hf_tiny[0]), str(out / "q"), "-m", "awq",
                             "--group-size", "32", "--calib-data", str(text), "--calib-samples", "256",
                             "--calib-seq-len", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob(".q.partial-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("the conversion finished before it could be interrupted")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["calib.txt"]

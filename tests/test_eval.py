"""qwen2q eval: text sources, reports, determinism."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_checkpoint
from qwen2q.quantization import quantize as convert
from qwen2q.errors import Qwen2qError
from qwen2q.evals.data import load_text
from qwen2q.qconfig import QuantConfig


def test_data_folder_wins_and_is_used_as_is(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" \n = Title = \n text\n")
    monkeypatch.setenv("QWEN2Q_DATA", str(tmp_path))
    t = load_text("auto")
    assert t.name == "wikitext2" and t.text == " \n = Title = \n text\n" and str(tmp_path) in t.source


def test_offline_without_wikitext_falls_back_or_fails_clearly(tmp_path, monkeypatch):
    import qwen2q.evals.data as data

    monkeypatch.setattr(data, "_data_folders", lambda: [tmp_path])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = load_text("auto")
    assert t.name == "pydoc-topics" and len(t.text) > 100_000
    with pytest.raises(Qwen2qError, match="WikiText-2 not found"):
        load_text("wikitext2")


def test_paths(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("hello world")
    assert load_text(str(f)).text == "hello world"
    with pytest.raises(Qwen2qError, match="folder without"):
        load_text(str(tmp_path))
    with pytest.raises(Qwen2qError, match="nor an existing file"):
        load_text(str(tmp_path / "absent.txt"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_hf_checkpoint(root / "bf16", dtype=torch.bfloat16, seed=2)
    convert(root / "bf16", root / "nf4", QuantConfig("nf4"), progress=False)
    return root


def _eval(root, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qwen2q.cli", "eval", str(root / "nf4"), "-r", str(root / "bf16"),
                           "--dataset", "pydoc", "--seq-len", "128", "--max-windows", "3", *extra],
                          capture_output=True, text=True, cwd="/", env=env, timeout=600)


def test_eval_reports_are_complete_and_deterministic(pair, tmp_path):
    runs = []
    for i in range(2):
        r = _eval(pair, "--json", str(tmp_path / f"{i}.json"))
        assert r.returncode == 0, r.stderr
        assert "seq len 128, 3 windows, 381 scored tokens" in r.stdout
        runs.append(json.loads((tmp_path / f"{i}.json").read_text()))
    strip = lambda d: [{k: v for k, v in row.items() if k != "seconds"} for row in d["rows"]]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    row = runs[0]["rows"][1]
    assert row["method"] == "nf4" and 0 < row["kl"] < 1 and 0 < row["top1"] <= 1
    assert row["ppl_ratio"] == pytest.approx(row["ppl"] / runs[0]["rows"][0]["ppl"])
    assert runs[0]["settings"]["dataset"] == "pydoc-topics" and runs[0]["settings"]["seq_len"] == 128


def test_eval_json_keeps_per_window_figures_for_paired_comparisons(pair, tmp_path):
    """Each compared row keeps its per-window KL and NLL (their means are the row's KL and log-perplexity),
    so that `dev paired` can put an interval on the gap between two rows scored on the same windows."""
    import dev_modules  # noqa: F401 (puts dev/ on sys.path)
    from qwen2q_dev.research import paired

    r = _eval(pair, "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "e.json").read_text())["rows"][1]
    assert len(row["window_kl"]) == len(row["window_nll"]) == len(row["window_nll_reference"]) == 3
    assert sum(row["window_kl"]) / 3 == pytest.approx(row["kl"], rel=1e-9)
    assert math.exp(sum(row["window_nll"]) / 3) == pytest.approx(row["ppl"], rel=1e-9)
    a = paired.load_row(f"{tmp_path / 'e.json'}:{row['name']}")
    (gap,) = paired.compare_rows([a, a])
    assert gap["ppl_gap"] == 0 and gap["kl_gap"] == 0


def test_eval_plot(pair, tmp_path):
    pytest.importorskip("matplotlib")
    r = _eval(pair, "--plot", str(tmp_path / "drift.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_without_wikitext_says_so(pair):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QWEN2Q_DATA": "/nonexistent"}
    r = subprocess.run([sys.executable, "-m", "qwen2q.cli", "eval", str(pair / "bf16"), "--dataset", str(pair)],
                       capture_output=True, text=True, cwd="/", env=env, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "folder without" in r.stderr


@pytest.mark.slow
def test_demo_on_the_embedded_model(tmp_path):
    from conftest import shared_data

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "qwen2q.cli", "demo", "--max-windows", "2", "--json", str(tmp_path / "d.json")],
                       capture_output=True, text=True, cwd="/", env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "d.json").read_text())
    methods = [row["method"] for row in result["rows"]]
    expected = ["bf16", "nf4", "int8", "int4-g128"] + (["awq-g128"] if shared_data() else [])
    assert methods == expected
    for row in result["rows"][1:]:
        assert row["kl"] >= 0 and 0 < row["top1"] <= 1 and row["bits_per_weight"] > 4 and row["quantize_seconds"] >= 0
    assert "bits/w" in r.stdout and "quant s" in r.stdout


def test_rows_are_named_by_folder_by_path_on_a_clash_or_as_given(pair, tmp_path):
    import shutil

    shutil.copytree(pair / "nf4", tmp_path / "other" / "nf4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "qwen2q.cli", "eval", "-r", str(pair / "bf16"), "--dataset", "pydoc",
            "--seq-len", "64", "--max-windows", "1", "--json"]
    r = subprocess.run([*args, str(tmp_path / "a.json"), str(pair / "nf4"), str(tmp_path / "other" / "nf4")],
                       capture_output=True, text=True, cwd="/", env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    names = [row["name"] for row in json.loads((tmp_path / "a.json").read_text())["rows"]]
    assert names == ["reference", str(pair / "nf4"), str(tmp_path / "other" / "nf4")]
    r = subprocess.run([*args, str(tmp_path / "b.json"), f"mine={tmp_path / 'other' / 'nf4'}", str(pair / "nf4")],
                       capture_output=True, text=True, cwd="/", env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["reference", "mine", "nf4"] and rows[1]["method"] == "nf4"
    assert r.stdout.splitlines()[1].split()[:2] == ["model", "method"]


def test_plot_without_reference_and_bad_calibration_text_are_refused_before_any_work(pair, tmp_path):
    from cli_support import one_line_error, run_cli

    one_line_error(run_cli("eval", pair / "nf4", "--plot", tmp_path / "p.png"), "--plot needs --reference")
    one_line_error(run_cli("demo", "--calib-data", tmp_path / "missing.txt"), "missing.txt")
    assert list(tmp_path.iterdir()) == []

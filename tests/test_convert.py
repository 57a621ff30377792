"""qwen2q quantize: results that load and track the source, and every bad input refused cleanly."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_checkpoint
from qwen2q.quantization import quantize as convert
from qwen2q.errors import Qwen2qError
from qwen2q.loader import load_model
from qwen2q.qconfig import QuantConfig


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    make_hf_checkpoint(path, dtype=torch.bfloat16, tie_word_embeddings=True, seed=3)
    return path


IDS = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("method,bound", [("nf4", 0.2), ("int8", 0.02), ("int4", 0.15)])
def test_quantized_model_tracks_source(src, tmp_path, method, bound):
    report = convert(src, tmp_path / "q", QuantConfig(method, group_size=64), progress=False)
    with torch.no_grad():
        ref = load_model(src, dtype="float32")(IDS)
        got = load_model(tmp_path / "q", dtype="float32")(IDS)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < bound
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["qwen2q"]["method"] == method and cfg["quantization_config"]["quant_method"] in ("bitsandbytes", "awq")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "q" / f).read_bytes() == (src / f).read_bytes()
    assert report.bytes_after < report.bytes_before
    assert "lm_head.weight" not in load_file(tmp_path / "q" / "model.safetensors")  # tied: stored once


def test_small_shards_write_an_index_that_loads(src, tmp_path):
    report = convert(src, tmp_path / "q", QuantConfig("int4", group_size=32), max_shard_bytes=50_000, progress=False)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert report.shards > 2 and len(set(index["weight_map"].values())) == report.shards
    single = convert(src, tmp_path / "one", QuantConfig("int4", group_size=32), progress=False)
    assert single.shards == 1
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "q")(IDS), load_model(tmp_path / "one")(IDS))


def test_group_size_that_does_not_divide(tmp_path):
    make_hf_checkpoint(tmp_path / "src", intermediate_size=96)  # down_proj in_features 96
    with pytest.raises(Qwen2qError) as e:
        convert(tmp_path / "src", tmp_path / "q", QuantConfig("int4", group_size=64), progress=False)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg and "96" in msg and "[32]" in msg
    assert not (tmp_path / "q").exists()


def test_nan_weight_names_the_tensor(tmp_path):
    make_hf_checkpoint(tmp_path / "src")
    f = tmp_path / "src" / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.self_attn.k_proj.weight"][3, 4] = float("nan")
    save_file(state, f)
    with pytest.raises(Qwen2qError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*NaN"):
        convert(tmp_path / "src", tmp_path / "q", QuantConfig("nf4"), progress=False)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.partial*"))


def test_unknown_method():
    with pytest.raises(Qwen2qError, match="unknown quantization method 'int3'"):
        QuantConfig("int3")


@pytest.mark.parametrize("where", ["same", "inside"])
def test_destination_equal_to_or_inside_source(src, where):
    dst = src if where == "same" else src / "sub"
    with pytest.raises(Qwen2qError, match="inside"):
        convert(src, dst, QuantConfig("int8"), progress=False)
    assert not (src / "sub").exists()


def test_non_empty_destination_needs_force(src, tmp_path):
    """--force replaces a checkpoint qwen2q wrote; a folder holding anything else is never replaced."""
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(Qwen2qError, match="--force"):
        convert(src, tmp_path / "q", QuantConfig("int8"), progress=False)
    assert (tmp_path / "q" / "keep.txt").exists()
    with pytest.raises(Qwen2qError, match="keep.txt"):
        convert(src, tmp_path / "q", QuantConfig("int8"), force=True, progress=False)
    assert (tmp_path / "q" / "keep.txt").read_text() == "mine"
    convert(src, tmp_path / "q2", QuantConfig("int8"), progress=False)
    convert(src, tmp_path / "q2", QuantConfig("nf4"), force=True, progress=False)
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["qwen2q"]["method"] == "nf4"


def test_already_quantized_source_refused(src, tmp_path):
    convert(src, tmp_path / "q", QuantConfig("int8"), progress=False)
    with pytest.raises(Qwen2qError, match="already quantized"):
        convert(tmp_path / "q", tmp_path / "qq", QuantConfig("nf4"), progress=False)


SLOW_CONVERT = """
import sys, time
import qwen2q.quantization as c
from qwen2q.qconfig import QuantConfig
real = c.quantize_linear
def slow(*a):
    print("tick", flush=True)
    time.sleep(0.5)
    return real(*a)
c.quantize_linear = slow
c.quantize(sys.argv[1], sys.argv[2], QuantConfig("nf4"), progress=False)
"""


def test_killed_conversion_leaves_nothing_that_loads(src, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(src), str(tmp_path / "q")],
                            stdout=subprocess.PIPE, text=True, cwd="/")
    for _ in range(3):  # let it write some shard data
        assert proc.stdout.readline().startswith("tick")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "q").exists()
    partial = list(tmp_path.glob(".q.partial-*"))
    assert len(partial) == 1 and not (partial[0] / "config.json").exists()
    with pytest.raises(Qwen2qError):
        load_model(partial[0])
    # A rerun removes the dead run's leftovers and succeeds.
    convert(src, tmp_path / "q", QuantConfig("nf4"), progress=False)
    load_model(tmp_path / "q")
    assert not list(tmp_path.glob(".q.partial-*"))


def test_cli_quantize_prints_summary(src, tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen2q.cli", "quantize", str(src), str(tmp_path / "q"), "-m", "int4",
                        "--group-size", "32"], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr
    for field in ("size before", "size after", "bits / weight", "time", "peak RSS"):
        assert field in r.stdout
    bad = subprocess.run([sys.executable, "-m", "qwen2q.cli", "quantize", str(src), str(src), "-m", "int4"],
                         capture_output=True, text=True, cwd="/", timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")

"""`qwen2q quantize` never destroys what the user owns (issue 17, items 1-3, 10-12).

Every case runs the real command in a subprocess and checks the exit code, the single `error:` line,
the absence of a traceback, and that nothing outside DST changed (sha256 of every file around it).
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_support import one_line_error, run_cli, tree_digest
from conftest import make_hf_checkpoint
from qwen2q.loader import load_model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    make_hf_checkpoint(path, dtype=torch.bfloat16, tie_word_embeddings=True, seed=5)
    return path


@pytest.fixture
def work(tmp_path):
    """An output area holding a file of the user's that must survive every run."""
    (tmp_path / "user-notes.txt").write_text("mine\n")
    return tmp_path


def unchanged(*roots):
    """Snapshot `roots`; calling the result asserts that none of them changed."""
    before = [tree_digest(r) for r in roots]
    return lambda: [tree_digest(r) for r in roots] == before


def last_line_error(result, *needles):
    """For errors raised mid-run, after a progress bar: exactly one `error:` line, the last one, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert errors == [lines[-1]], result.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


# A conversion slowed down per tensor so another process can act while it runs; prints "tick" per linear.
SLOW_CLI = """
import sys, time
import qwen2q.quantization as c
real, delay = c.quantize_linear, float(sys.argv[1])
def slow(*a):
    print("tick", flush=True)
    time.sleep(delay)
    return real(*a)
c.quantize_linear = slow
from qwen2q.cli import main
sys.argv = ["qwen2q", *sys.argv[2:]]
main()
"""


def slow_quantize(delay, *args):
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(delay), "quantize", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_forgotten_dst_never_replaces_the_model(src, work):
    """`qwen2q quantize ./MyModel -m nf4`: SRC and DST are both required; the model is untouched."""
    same = unchanged(src, work)
    one_line_error(run_cli("quantize", src, "-m", "nf4"), "needs SRC and DST", "qwen2q:tiny")
    one_line_error(run_cli("quantize", src, "-m", "nf4", "--force"), "needs SRC and DST")
    assert same()


def test_embedded_model_is_named_explicitly(work):
    r = run_cli("quantize", "qwen2q:tiny", work / "q", "-m", "int8")
    assert r.returncode == 0, r.stderr
    assert json.loads((work / "q" / "config.json").read_text())["qwen2q"]["method"] == "int8"
    load_model(work / "q")


def test_force_refuses_a_folder_qwen2q_did_not_write(src, work):
    (work / "q").mkdir()
    (work / "q" / "notes.txt").write_text("a week of notes")
    same = unchanged(src, work)
    one_line_error(run_cli("quantize", src, work / "q", "-m", "int8", "--force"),
                   "not a qwen2q checkpoint", "notes.txt")
    one_line_error(run_cli("quantize", src, work / "q", "-m", "int8"), "not empty")
    assert same()


def test_force_refuses_a_model_the_user_saved(src, work):
    hf = work / "hf"
    make_hf_checkpoint(hf, seed=1)
    same = unchanged(src, work)
    one_line_error(run_cli("quantize", src, hf, "-m", "int8", "--force"), "no \"qwen2q\" note")
    assert same()


def test_force_replaces_our_checkpoint_and_leaves_nothing_else(src, work):
    assert run_cli("quantize", src, work / "q", "-m", "int8").returncode == 0
    neighbours = unchanged(src, work / "user-notes.txt")
    r = run_cli("quantize", src, work / "q", "-m", "nf4", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((work / "q" / "config.json").read_text())["qwen2q"]["method"] == "nf4"
    assert sorted(p.name for p in work.iterdir()) == ["q", "user-notes.txt"]  # no lock, partial or old copy
    assert neighbours()


def test_concurrent_runs_into_one_dst(src, work):
    """The second run is refused at once; the first one's result is the one in DST."""
    first = slow_quantize(0.5, src, work / "q", "-m", "nf4")
    assert first.stdout.readline().startswith("tick")
    second = run_cli("quantize", src, work / "q", "-m", "int8")
    assert first.poll() is None, first.communicate()
    one_line_error(second, "another qwen2q run", str(first.pid))
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert json.loads((work / "q" / "config.json").read_text())["qwen2q"]["method"] == "nf4"
    assert sorted(p.name for p in work.iterdir()) == ["q", "user-notes.txt"]


def test_file_written_into_dst_during_a_run_survives(src, work):
    proc = slow_quantize(0.2, src, work / "q", "-m", "nf4")
    assert proc.stdout.readline().startswith("tick")
    (work / "q").mkdir()
    (work / "q" / "notes.txt").write_text("written while it ran")
    _, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    kept = work / f"q.qwen2q-{proc.pid}"
    last_line_error(result, "left", "written into it during the run", str(kept))
    assert (work / "q" / "notes.txt").read_text() == "written while it ran"
    assert sorted(p.name for p in (work / "q").iterdir()) == ["notes.txt"]
    load_model(kept)  # the new checkpoint is complete, and kept where the error says


# SIGTERM arrives between renaming the old DST aside and renaming the new one in.
SLOW_INSTALL = """
import os, sys, time
import qwen2q.destination as d
real = os.rename
def rename(a, b):
    real(a, b)
    if ".replaced-" in str(b):
        print("aside", flush=True)
        time.sleep(1.0)
d.os.rename = rename
from qwen2q.cli import main
sys.argv = ["qwen2q", *sys.argv[1:]]
main()
"""


def test_sigterm_during_force_replacement_loses_nothing(src, work):
    assert run_cli("quantize", src, work / "q", "-m", "int8").returncode == 0
    proc = subprocess.Popen([sys.executable, "-c", SLOW_INSTALL, "quantize", str(src), str(work / "q"), "-m", "nf4",
                             "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout.readline().strip() == "aside"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    # The replacement ran to its end before the signal was taken: DST is whole and new, nothing is left aside.
    assert json.loads((work / "q" / "config.json").read_text())["qwen2q"]["method"] == "nf4"
    load_model(work / "q")
    assert sorted(p.name for p in work.iterdir()) == ["q", "user-notes.txt"]


def test_killed_run_leftovers_are_removed_only_if_ours(src, work):
    """A hidden folder with a partial's name but not made by qwen2q is never deleted."""
    lookalike = work / ".q.partial-999999"
    lookalike.mkdir()
    (lookalike / "data.bin").write_bytes(b"not ours")
    r = run_cli("quantize", src, work / "q", "-m", "int8")
    assert r.returncode == 0, r.stderr
    assert (lookalike / "data.bin").read_bytes() == b"not ours"


def test_dst_symlink_refused(src, work):
    target = work / "real"
    target.mkdir()
    (work / "link").symlink_to(target)
    same = unchanged(src, work)
    one_line_error(run_cli("quantize", src, work / "link", "-m", "int8", "--force"), "symbolic link")
    assert same()


def test_output_paths_checked_before_work(work):
    t0 = time.perf_counter()
    one_line_error(run_cli("eval", "--json", work / "missing" / "drift.json"), "does not exist")
    one_line_error(run_cli("eval", "--plot", work / "missing" / "drift.png"), "does not exist")
    one_line_error(run_cli("demo", "--json", work), "is a directory")
    one_line_error(run_cli("bench", "--json", work / "missing" / "b.json"), "does not exist")
    assert time.perf_counter() - t0 < 60  # refused at once, not after an evaluation
    assert sorted(p.name for p in work.iterdir()) == ["user-notes.txt"]


@pytest.mark.parametrize("args,needle", [
    (["-m", "nf4", "--group-size", "64"], "--group-size applies to"),
    (["-m", "int8", "--group-size", "32"], "--group-size applies to"),
    (["-m", "nf4", "--skip", "dwn_proj"], "--skip dwn_proj matches no linear"),
    (["-m", "int8", "--skip", "model.layers"], "leaves no linear to quantize"),
    (["-m", "int4", "--max-shard-size", "0MB"], "positive size"),
    (["-m", "int4", "--max-shard-size", "-1GB"], "positive size"),
    (["-m", "int4", "--max-shard-size", "infGB"], "not a size"),
    (["-m", "int8", "--calib-samples", "4"], "calibration option"),
    (["-m", "int4", "--rounding", "nearest"], "calibration option"),
])
def test_ignored_options_are_refused(src, work, args, needle):
    same = unchanged(src, work)
    one_line_error(run_cli("quantize", src, work / "q", *args), needle)
    assert same()


def test_skip_by_suffix_and_prefix_still_work(src, work):
    r = run_cli("quantize", src, work / "q", "-m", "int8", "--skip", "down_proj", "--skip", "model.layers.1")
    assert r.returncode == 0, r.stderr
    names = set(load_file(work / "q" / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.down_proj.SCB" not in names
    assert "model.layers.1.self_attn.q_proj.SCB" not in names and "model.layers.0.self_attn.q_proj.SCB" in names


def test_quantize_allow_pickle(src, work):
    """The option the refusal names exists, and a pickle source quantizes exactly like its safetensors twin."""
    pkl = work / "pkl"
    pkl.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (pkl / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(src / "model.safetensors"), pkl / "pytorch_model.bin")
    one_line_error(run_cli("quantize", pkl, work / "a", "-m", "int4", "--group-size", "32"), "--allow-pickle")
    assert not (work / "a").exists()
    r = run_cli("quantize", pkl, work / "a", "-m", "int4", "--group-size", "32", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert run_cli("quantize", src, work / "b", "-m", "int4", "--group-size", "32").returncode == 0
    a, b = load_file(work / "a" / "model.safetensors"), load_file(work / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with those options, unmounted after the test."""
    mounted = []

    def mount(options: str) -> Path:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)])


def test_disk_full_is_one_line_and_leaves_nothing(src, tmpfs):
    small_disk = tmpfs("size=128k")
    same = unchanged(src)
    last_line_error(run_cli("quantize", src, small_disk / "q", "-m", "int8"), "No space left on device")
    assert list(small_disk.iterdir()) == [] and same()


def test_read_only_parent_is_one_line(src, tmpfs):
    read_only_disk = tmpfs("ro,size=64k")
    one_line_error(run_cli("quantize", src, read_only_disk / "q", "-m", "int8"), "read-only")
    one_line_error(run_cli("quantize", src, read_only_disk / "sub" / "q", "-m", "int8"), "read-only")

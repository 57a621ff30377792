"""The bad inputs and faults of issue 17, run against any qwen2q install; prints one table row per case.

    python tests/reliability_cases.py [PYTHON] [--markdown]

PYTHON is the interpreter of the qwen2q install to try (default: this one), so the same cases can be run
on an older checkout to show what changed.  Each row: exit code, whether stderr held a traceback, the number
of `error:` lines, whether any file that existed before the run changed or vanished (sha256 of the source,
a pre-existing DST and everything around them), and stderr's last line.  Needs transformers (the test extra) to build the tiny checkpoints.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from cli_support import tree_digest  # noqa: E402
from conftest import make_hf_checkpoint  # noqa: E402


def model(root: Path, name="m", **overrides) -> Path:
    path = root / name
    path.mkdir()
    make_hf_checkpoint(path, dtype=torch.bfloat16, tie_word_embeddings=True, **overrides)
    return path


def edit_config(path: Path, **fields) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def edit_tensor(path: Path, name: str, fn) -> Path:
    state = load_file(path / "model.safetensors")
    state[name] = fn(state[name]).contiguous()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def outside_index(root: Path, entry: str) -> Path:
    m = model(root)
    f = m / "model.safetensors"
    if entry == "absolute":
        other = model(root, "other")
        entry = str(other / "model.safetensors")
    state = load_file(f)
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: entry for k in state}}))
    f.unlink()
    return m


def pickle_model(root: Path, legacy: bool) -> Path:
    m = model(root)
    state = load_file(m / "model.safetensors")
    torch.save(state, m / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    (m / "model.safetensors").unlink()
    return m


def our_checkpoint_with_notes(root: Path) -> Path:
    (root / "q").mkdir()
    (root / "q" / "notes.txt").write_text("notes")
    return root / "q"


def symlink(root: Path) -> Path:
    (root / "elsewhere").mkdir()
    (root / "link").symlink_to(root / "elsewhere")
    return root / "link"


def template(root: Path, body: str) -> Path:
    m = model(root)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["chat_template"] = body
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    return m


API = "import qwen2q, sys; m = qwen2q.load(sys.argv[1]); "

# (item, case, setup(root) -> argv for `python -m qwen2q.cli` (or `-c CODE ...`))
CASES = [
    ("1", "quantize MODEL -m nf4 --force (DST forgotten)", lambda r: ["quantize", model(r), "-m", "nf4", "--force"]),
    ("1", "--force onto a folder holding notes.txt",
     lambda r: ["quantize", model(r), our_checkpoint_with_notes(r), "-m", "int8", "--force"]),
    ("3", "eval --json into a missing folder", lambda r: ["eval", "--max-windows", "1", "--seq-len", "64",
                                                         "--json", r / "missing" / "x.json"]),
    ("4", "index entry ../../../../etc/passwd", lambda r: ["info", outside_index(r, "../../../../etc/passwd")]),
    ("4", "index entry: absolute path to another model", lambda r: ["quantize", outside_index(r, "absolute"),
                                                                    r / "q", "-m", "int8"]),
    ("5", "down_proj of the wrong shape, quantize",
     lambda r: ["quantize", edit_tensor(model(r), "model.layers.0.mlp.down_proj.weight", lambda t: t[:, :128]),
                r / "q", "-m", "int8"]),
    ("5", "half-size embedding, generate",
     lambda r: ["generate", edit_tensor(model(r), "model.embed_tokens.weight", lambda t: t[:160]), "-p", "x",
                "--max-new-tokens", "2"]),
    ("5", "int32 weight, generate",
     lambda r: ["generate", edit_tensor(model(r), "model.layers.0.mlp.up_proj.weight", lambda t: t.to(torch.int32)),
                "-p", "x", "--max-new-tokens", "2"]),
    ("6", "NaN in model.norm.weight, quantize",
     lambda r: ["quantize", edit_tensor(model(r), "model.norm.weight", lambda t: t * float("nan")), r / "q",
                "-m", "nf4"]),
    ("6", "NaN weights, eval",
     lambda r: ["eval", edit_tensor(model(r), "model.norm.weight", lambda t: t * float("nan")), "--max-windows", "1",
                "--seq-len", "64"]),
    ("7", "config.json is a JSON list", lambda r: ["info", (lambda m: ((m / "config.json").write_text("[1, 2]"), m)[1])(
        model(r))]),
    ("7", "hidden_size 0", lambda r: ["info", edit_config(model(r), hidden_size=0)]),
    ("7", "hidden_size \"abc\"", lambda r: ["info", edit_config(model(r), hidden_size="abc")]),
    ("7", "num_key_value_heads 0", lambda r: ["info", edit_config(model(r), num_key_value_heads=0)]),
    ("8", "eval across vocabularies", lambda r: ["eval", model(r, "a"), "--reference", model(r, "b", vocab_size=400),
                                                 "--max-windows", "1", "--seq-len", "64"]),
    ("9", "generate 1500 tokens on a 512-token model",
     lambda r: ["generate", model(r), "-p", "The quick", "--max-new-tokens", "1500"]),
    ("10", "bench --device cuda on a CPU-only torch", lambda r: ["bench", "--device", "cuda"]),
    ("10", "generate --device tpu7", lambda r: ["generate", "-p", "x", "--device", "tpu7"]),
    ("10", "chat template range(10**9)",
     lambda r: ["generate", template(r, "{% for i in range(10**9) %}x{% endfor %}"), "--chat", "-p", "hi"]),
    ("10", "legacy pickle with --allow-pickle", lambda r: ["generate", pickle_model(r, legacy=True), "-p", "x",
                                                           "--allow-pickle", "--max-new-tokens", "2"]),
    ("10", "DST is a symlink (to an empty folder)", lambda r: ["quantize", model(r), symlink(r), "-m", "int8"]),
    ("10", "API: load(device='cuda') on a CPU build",
     lambda r: ["-c", "import qwen2q; qwen2q.load(device='cuda')"]),
    ("10", "API: token id out of range",
     lambda r: ["-c", API + "m.generate([10**6], max_new_tokens=2)", model(r)]),
    ("10", "API: chat message that is not a dict",
     lambda r: ["-c", API + "m.chat(['hello'])", model(r)]),
    ("11", "quantize a pickle source with --allow-pickle",
     lambda r: ["quantize", pickle_model(r, legacy=False), r / "q", "-m", "int8", "--allow-pickle"]),
    ("12", "--group-size 64 with nf4", lambda r: ["quantize", model(r), r / "q", "-m", "nf4", "--group-size", "64"]),
    ("12", "--skip that matches nothing", lambda r: ["quantize", model(r), r / "q", "-m", "nf4", "--skip", "dwn_proj"]),
    ("12", "--skip that leaves nothing quantized",
     lambda r: ["quantize", model(r), r / "q", "-m", "nf4", "--skip", "model.layers"]),
    ("12", "--max-shard-size 0MB", lambda r: ["quantize", model(r), r / "q", "-m", "nf4", "--max-shard-size", "0MB"]),
]


PROGRESS = re.compile(r"\d+%\|")  # tqdm's bars


def run_case(python: str, setup) -> dict:
    with tempfile.TemporaryDirectory(prefix="qwen2q-case-") as tmp:
        root = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            argv = [str(a) for a in setup(root)]
        watched = {p.name: tree_digest(p) for p in root.iterdir()}  # everything that existed before the run
        cmd = [python, *argv] if argv[0] == "-c" else [python, "-m", "qwen2q.cli", *argv]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=300)
            rc, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired:
            rc, err = "timeout", ""
        changed = {p.name: tree_digest(p) for p in root.iterdir() if p.name in watched} != watched
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]
        return {"rc": rc, "traceback": "Traceback" in err, "error_lines": sum(ln.startswith("error:") for ln in lines),
                "changed": changed, "last": (lines[-1] if lines else "")[:110]}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    python = args[0] if args else sys.executable
    markdown = "--markdown" in sys.argv
    if markdown:
        print("| item | case | exit | traceback | error lines | a file that existed changed | last line of stderr |")
        print("|---|---|---|---|---|---|---|")
    for item, case, setup in CASES:
        try:
            row = run_case(python, setup)
        except Exception as e:  # a broken setup is a bug of this script: say so in the row, go on
            row = {"rc": "setup failed", "traceback": False, "error_lines": 0, "changed": False, "last": repr(e)[:110]}
        cells = [item, case, str(row["rc"]), "yes" if row["traceback"] else "no", str(row["error_lines"]),
                 "YES" if row["changed"] else "no", row["last"].replace("|", "/")]
        print("| " + " | ".join(cells) + " |" if markdown else "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()

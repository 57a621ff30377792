"""Running the real `qwen2q` command in a subprocess and checking what it did to the disk.

Used by the reliability tests: every bad input must end in exactly one `error:` line on stderr, a
non-zero exit and no traceback, and must leave every file outside the output directory unchanged.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args, stdin: str | None = None, env: dict | None = None, timeout: float = 300,
            cwd: str | Path = "/") -> subprocess.CompletedProcess:
    """Run `python -m qwen2q.cli ARGS` offline; stdout/stderr captured as text."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qwen2q.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=full_env, cwd=str(cwd), timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert a non-zero exit whose stderr is a single `error: ...` line containing every needle; return it."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree_digest(root: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (symlinks by target text), directories as 'dir'."""
    root = Path(root)
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out

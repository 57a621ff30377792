"""Puts the checkout's dev/ folder on sys.path, so that tests can import the research and developer tools.

They live in dev/qwen2q_dev, in the repository and out of the wheel.  dev/ goes on sys.path, never the
repository root: the root's kernels/ folder would shadow the Hugging Face `kernels` package.  Tests
`import dev_modules` before `from qwen2q_dev... import ...`; `exit_status` runs a command's `main` the way
its process would end.
"""
from __future__ import annotations

import sys
from pathlib import Path

DEV = Path(__file__).resolve().parents[1] / "dev"
DEV_CLI = [sys.executable, str(DEV)]  # `python dev`: the command line of the dev commands

if str(DEV) not in sys.path:
    sys.path.insert(0, str(DEV))


def exit_status(main, argv: list[str]) -> int:
    """The exit status `main(argv)` ends with: its return value, or the status it exits with (SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code

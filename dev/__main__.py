"""`python dev COMMAND ...` from the repository root: qwen2q's research and developer commands.

Python runs this folder as a script, so dev/ (not the repository root, whose kernels/ folder would shadow
the Hugging Face `kernels` package) is what lands on sys.path; `qwen2q_dev` imports from there.
"""
import sys

from qwen2q_dev.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""The `dev` command group: `python dev COMMAND ...` from a checkout.

It runs under the product CLI's exit-code policy (`qwen2q.cli.ExitCodeGroup`): 0 ok, 1 a user error
given as one `error:` line on stderr, 2 bad usage, 130 interrupted; a command may also return 1 itself
(compare-peers when a row failed).  Options shared with `qwen2q` come from `qwen2q.cli_options`.
"""
from __future__ import annotations

import click

from qwen2q.cli import ExitCodeGroup

PROG = "python dev"


@click.group(cls=ExitCodeGroup, context_settings={"help_option_names": ["-h", "--help"]})
def dev():
    """qwen2q's research and developer commands (not installed with the package).

    \b
    Examples:
      python dev compare-peers ./Qwen2.5-Coder-0.5B-Instruct --seq-len 512 --max-windows 32 --json peers.json
      python dev paired llmc.json ours.json --first 32
      python dev random-checkpoint /tmp/r7b --layers 2 --tokenizer-from ./Qwen2-7B
      python dev train-tiny --corpus wiki.utf8 --out /tmp/tiny
      TRITON_INTERPRET=1 python dev bench-kernels --smoke
      python dev bench-cpu ./Qwen2.5-Coder-0.5B ./q-int4 ./q-int8 ./q-nf4 --rounds 3
      python dev gpu-check --dry-run --out /tmp/gpu-check
    """


def _register() -> None:
    from qwen2q_dev.research import compare_peers, paired, size_vs_kl
    from qwen2q_dev.tools import bench_cpu, bench_kernels, gpu_check, random_checkpoint, train_tiny

    for module in (compare_peers, paired, size_vs_kl, random_checkpoint, train_tiny, bench_kernels, bench_cpu, gpu_check):
        dev.add_command(module.command)


def main(argv: list[str] | None = None) -> int:
    """Run `python dev ARGV` in this process: returns the command's exit status when it completes;
    user errors, bad usage and interrupts exit (SystemExit) with the policy's status, as click does."""
    if not dev.commands:
        _register()
    return dev.main(args=argv, prog_name=PROG) or 0


def run_command(command: click.Command, argv: list[str] | None = None) -> int:
    """`python dev NAME ARGV` for one command (what each module's `main(argv)` calls)."""
    return main([command.name, *(argv or [])])

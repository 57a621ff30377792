"""The lines the commands write to stderr beside their output: notes and the speed of a generation."""
from __future__ import annotations

import click


def speed(n_new: int, seconds: float) -> str:
    """How fast `n_new` tokens came in `seconds`: '48 new tokens in 3.90 s: 12.3 tokens/s'."""
    return f"{n_new} new token{'' if n_new == 1 else 's'} in {seconds:.2f} s: {n_new / max(seconds, 1e-9):.1f} tokens/s"


def dim(text: str) -> None:
    """Write `text` and a newline to stderr, dimmed on a terminal (click drops the style anywhere else)."""
    click.echo(click.style(text, dim=True), err=True)

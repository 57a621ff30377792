"""SIGTERM as an interrupt: `kill` runs the same cleanup as Ctrl-C, yet loops that survive Ctrl-C still stop."""
from __future__ import annotations


class Terminated(KeyboardInterrupt):
    """Raised on SIGTERM where Ctrl-C would raise KeyboardInterrupt.

    Code that lets Ctrl-C stop only the current step (a chat reply) must re-raise this one."""


def raise_terminated(signum, frame):
    """A signal handler (`signal.signal(signal.SIGTERM, raise_terminated)`) that raises `Terminated`."""
    raise Terminated

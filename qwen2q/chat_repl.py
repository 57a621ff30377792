"""`qwen2q chat`'s loop: read a line, run a /command or answer it, and keep the conversation.

Replies go to stdout; everything else (banner, notes, the speed line, /help) goes to stderr, so
`qwen2q chat < questions.txt > answers.txt` collects the replies alone.  With a terminal on stdin the loop
also shows a banner and a prompt, edits lines with readline (arrow keys, and the session's earlier lines
on up/down, kept in memory only: nothing is written to disk) and handles Ctrl-C as a shell does:

- during a reply, Ctrl-C stops that reply; the text shown so far stays in the conversation as the
  assistant's turn (a reply stopped before its first token drops the message it answered);
- at the prompt, Ctrl-C clears the line, and a second Ctrl-C in a row, or Ctrl-D, ends the session.

Piped input gets no banner and no prompt, and Ctrl-C ends the command as anywhere else.
"""
from __future__ import annotations

import re
import sys
import time

import click

from qwen2q.console import dim, speed
from qwen2q.generation import ContextError
from qwen2q.interrupts import Terminated
from qwen2q.sampling import SamplingParams

PROMPT = ">>> "
COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation (a --system message stays)",
    "/exit": "end the session (also Ctrl-D)",
    "/quit": "the same as /exit",
}
COMMAND = re.compile(r"/[A-Za-z]+")  # a line whose first word this matches is a command, never sent to the model


def note(text: str) -> None:
    """One `note:` line on stderr."""
    click.echo(f"note: {text}", err=True)


class ChatLoop:
    """One conversation with a loaded `QwenModel` (`m`); `run()` reads lines until the end of input or /exit."""

    def __init__(self, m, sampling: SamplingParams, system: str | None = None, interactive: bool = False):
        self.m, self.sampling, self.interactive = m, sampling, interactive
        self.head = [{"role": "system", "content": system}] if system else []
        self.history = list(self.head)
        self.refused = 0  # messages that did not fit the context even alone

    def run(self, name: str) -> int:
        """Talk until the input ends or the user leaves; return the exit status (1 if a message was refused)."""
        if self.interactive:
            try:
                import readline  # noqa: F401  (importing it gives input() line editing and in-memory history)
            except ImportError:  # a Python built without readline: plain input still works
                pass
            self.banner(name)
        interrupted = False  # the previous prompt ended in Ctrl-C
        while True:
            try:
                line = input(PROMPT if self.interactive else "").strip()
            except EOFError:
                if self.interactive:
                    click.echo("")  # Ctrl-D leaves the cursor after the prompt
                break
            except KeyboardInterrupt as e:  # at the prompt: clear the line; twice in a row: leave
                if isinstance(e, Terminated) or not self.interactive:
                    raise
                click.echo("")
                if interrupted:
                    break
                dim("(Ctrl-C again or Ctrl-D to leave)")
                interrupted = True
                continue
            interrupted = False
            if not line:
                continue
            if COMMAND.fullmatch(line.split()[0]):
                if self.command(line.split()[0]):
                    break
                continue
            self.answer(line)
        return 1 if self.refused else 0

    def banner(self, name: str) -> None:
        """The first two lines of a terminal session: what runs where, and how to get help."""
        m = self.m
        dtype = str(m.dtype).removeprefix("torch.")
        click.echo(f"qwen2q chat: {name} ({dtype}, {m.device}, context {m.config.max_position_embeddings} tokens)",
                   err=True)
        dim("/help for commands, Ctrl-D or /exit to leave")

    def command(self, word: str) -> bool:
        """Run a /command; True when it ends the session."""
        word = word.lower()
        if word in ("/exit", "/quit"):
            return True
        if word == "/help":
            for name, what in COMMANDS.items():
                click.echo(f"  {name:<8} {what}", err=True)
            dim("  Ctrl-C stops a reply; at the prompt it clears the line (twice in a row: leave).")
        elif word == "/reset":
            self.history = list(self.head)
            note("conversation cleared" + (" (the system message stays)" if self.head else ""))
        else:
            note(f"unknown command {word}, not sent to the model; /help lists the commands")
        return False

    def answer(self, text: str) -> None:
        """Send `text` as the user's message and stream the reply, trimming old turns to fit the context."""
        s = self.sampling
        try:
            history, dropped = self.m.fit_chat(self.history + [{"role": "user", "content": text}], s.max_new_tokens)
        except ContextError as e:
            click.echo(f"error: {e}", err=True)
            self.refused += 1
            return
        if dropped:
            note(f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} (message and reply) "
                 f"to fit the model's context of {self.m.config.max_position_embeddings} tokens")
        shown: list[str] = []
        stream = self.m.text_stream(lambda piece: (shown.append(piece), sys.stdout.write(piece), sys.stdout.flush()))
        start = time.perf_counter()
        try:
            reply = self.m.chat(history, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                top_p=s.top_p, seed=s.seed, on_token=stream)
            stopped = False
        except KeyboardInterrupt as e:  # Ctrl-C stops this reply only
            if isinstance(e, Terminated) or not self.interactive:
                raise
            reply, stopped = "".join(shown), True
        elapsed = time.perf_counter() - start
        click.echo("")
        if stopped and not reply:
            self.history = history[:-1]
            note("stopped before the reply began; the message is dropped")
            return
        self.history = history + [{"role": "assistant", "content": reply}]
        dim(f"[{'stopped: ' if stopped else ''}{speed(len(stream.ids), elapsed)}]")

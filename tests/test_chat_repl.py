"""`qwen2q chat` as a person uses it: in a pseudo-terminal (pexpect) with the embedded model, and the loop's
Ctrl-C handling in process, where the conversation it keeps can be read."""
import os
import re
import sys
import time

import pexpect
import pytest

import qwen2q
from qwen2q.chat_repl import ChatLoop
from qwen2q.interrupts import Terminated
from qwen2q.sampling import SamplingParams

PROMPT = ">>> "
SPEED = r"\[(stopped: )?(\d+) new tokens? in [\d.]+ s: [\d.]+ tokens/s\]"


@pytest.fixture
def chat():
    """Start `qwen2q chat ARGS` (the embedded model, offline) in a pseudo-terminal; closed after the test."""
    children = []

    def start(*args):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm"}
        child = pexpect.spawn(sys.executable, ["-m", "qwen2q.cli", "chat", *args], env=env, cwd="/",
                              encoding="utf-8", timeout=60, dimensions=(24, 200))  # a loaded machine is slow
        children.append(child)
        child.expect_exact(PROMPT)
        return child

    yield start
    for child in children:
        child.close(force=True)


def waiting_for_a_key(child) -> None:
    """Return once the child sleeps in readline's wait for the next key.

    CPython notices Ctrl-C at a prompt only when it interrupts that wait: a SIGINT landing in the few
    instructions between printing the prompt (or an echo) and starting to wait is taken only at the next
    Enter.  No person is that fast, but pexpect is (1 run in 5 here), so the terminal tests press Ctrl-C at
    a prompt only once the main thread has slept for three polls in a row (a short pause where /proc is
    missing)."""
    stat = f"/proc/{child.pid}/stat"
    if not os.path.exists(stat):
        time.sleep(0.5)
        return
    deadline, asleep = time.monotonic() + child.timeout, 0
    while asleep < 3:
        assert time.monotonic() < deadline, "the chat never waited for a key"
        with open(stat) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        asleep = asleep + 1 if state == "S" else 0
        time.sleep(0.02)


def ends(child) -> int:
    """Wait for the session to end; its exit status."""
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_banner_names_model_dtype_device_and_context_then_the_hint(chat):
    child = chat("--max-new-tokens", "8")
    lines = child.before.splitlines()
    assert lines[0] == "qwen2q chat: qwen2q:tiny (bfloat16, cpu, context 512 tokens)", child.before
    assert "/help for commands" in lines[1] and len(lines) == 2, child.before


def test_help_lists_the_commands(chat):
    child = chat()
    child.sendline("/help")
    child.expect_exact(PROMPT)
    for command in ("/help", "/reset", "/exit", "/quit"):
        assert re.search(rf"^\s+{command}\s", child.before, re.M), child.before
    child.sendline("/quit")
    assert ends(child) == 0


def test_reset_says_so(chat):
    child = chat("--max-new-tokens", "4", "--system", "Be brief.")
    child.sendline("hello")
    child.expect(SPEED)
    child.expect_exact(PROMPT)
    child.sendline("/reset")
    child.expect_exact(PROMPT)
    assert "note: conversation cleared (the system message stays)" in child.before


def test_unknown_command_gets_a_note_and_is_not_sent(chat):
    child = chat("--max-new-tokens", "4")
    child.sendline("/frobnicate now")
    child.expect_exact(PROMPT)
    assert "note: unknown command /frobnicate, not sent to the model; /help lists the commands" in child.before
    assert "tokens/s" not in child.before  # no reply was generated
    child.sendline("/exit")
    assert ends(child) == 0


def test_a_reply_is_followed_by_its_speed(chat):
    child = chat("--max-new-tokens", "8")
    child.sendline("hello")
    child.expect(SPEED)
    reply = child.before.split("hello\r\n", 1)[1]
    assert reply.strip() and child.match.group(1) is None and int(child.match.group(2)) <= 8
    child.expect_exact(PROMPT)


def test_ctrl_c_stops_the_reply_and_the_session_goes_on(chat):
    child = chat("--max-new-tokens", "40")  # a second or more of text: the tiny model seldom stops early
    child.sendline("hello")
    child.expect_exact("hello\r\n")
    child.expect(r"\w")  # the reply has begun
    child.sendintr()
    child.expect(SPEED)
    assert child.match.group(1) == "stopped: " and int(child.match.group(2)) < 40, child.before
    child.expect_exact(PROMPT)
    child.sendline("and then?")
    child.expect(SPEED)
    assert child.match.group(1) is None and "Traceback" not in child.before
    child.expect_exact(PROMPT)
    child.sendeof()
    assert ends(child) == 0


def test_ctrl_c_at_the_prompt_clears_the_line_and_a_second_one_leaves(chat):
    child = chat("--max-new-tokens", "4")
    child.send("half a thought")
    child.expect_exact("half a thought")  # readline has the line (a Ctrl-C before would drop it unread)
    waiting_for_a_key(child)
    child.sendintr()
    child.expect_exact(PROMPT)
    assert "Ctrl-C again or Ctrl-D to leave" in child.before
    child.sendline("")  # the cleared line was not sent: Enter on it does nothing
    child.expect_exact(PROMPT)
    assert "tokens/s" not in child.before
    waiting_for_a_key(child)
    child.sendintr()
    child.expect_exact(PROMPT)
    waiting_for_a_key(child)
    child.sendintr()
    child.expect(pexpect.EOF)
    assert child.before.endswith("\r\n") and "interrupted" not in child.before, child.before
    child.close()
    assert child.exitstatus == 0


def test_ctrl_d_leaves_with_a_newline(chat):
    child = chat()
    child.sendeof()
    child.expect(pexpect.EOF)
    assert child.before == "\r\n"
    child.close()
    assert child.exitstatus == 0


# --- the loop in process: what Ctrl-C leaves in the conversation ---------------------------------

@pytest.fixture(scope="module")
def tiny():
    return qwen2q.load()


class StopAt:
    """Wraps an on_token stream: raises `exc` when the next token would be token `n + 1` of the reply."""

    def __init__(self, stream, n, exc):
        self.stream, self.n, self.exc = stream, n, exc

    @property
    def ids(self):
        return self.stream.ids

    def __call__(self, token_id):
        if len(self.stream.ids) >= self.n:
            raise self.exc
        self.stream(token_id)


def stop_replies_at(monkeypatch, m, n, exc=KeyboardInterrupt):
    real = m.text_stream
    monkeypatch.setattr(m, "text_stream", lambda write: StopAt(real(write), n, exc()))


def test_a_stopped_reply_keeps_what_was_shown(tiny, monkeypatch, capsys):
    loop = ChatLoop(tiny, SamplingParams(max_new_tokens=50), system="Be brief.", interactive=True)
    stop_replies_at(monkeypatch, tiny, 3)
    loop.answer("hello")
    shown = capsys.readouterr()
    expected = tiny.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
                         max_new_tokens=3)
    assert shown.out == expected + "\n" and "[stopped: 3 new tokens in" in shown.err
    assert loop.history[1:] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": expected}]


def test_a_reply_stopped_before_its_first_token_drops_the_message(tiny, monkeypatch, capsys):
    loop = ChatLoop(tiny, SamplingParams(max_new_tokens=50), interactive=True)
    stop_replies_at(monkeypatch, tiny, 0)
    loop.answer("hello")
    assert loop.history == []
    assert "the message is dropped" in capsys.readouterr().err


@pytest.mark.parametrize("exc, interactive", [(Terminated, True), (KeyboardInterrupt, False)])
def test_sigterm_and_ctrl_c_on_piped_input_end_the_session(tiny, monkeypatch, exc, interactive):
    loop = ChatLoop(tiny, SamplingParams(max_new_tokens=50), interactive=interactive)
    stop_replies_at(monkeypatch, tiny, 2, exc)
    with pytest.raises(exc):
        loop.answer("hello")

"""Generation and chat stop at the model's context (max_position_embeddings) instead of running past it.

Oracle: the same random weights saved with a larger max_position_embeddings.  Default RoPE does not
depend on max_position_embeddings, so its logits are identical and its unconstrained greedy output is
what the short-context model must reproduce, cut at the context.
"""
import json
import shutil
import warnings

import pytest

import qwen2q
from cli_support import one_line_error, run_cli
from conftest import make_hf_checkpoint
from qwen2q.generation import ContextError, ContextLimitWarning, SamplingParams, generate_ids

CONTEXT = 64
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def short_and_long(tmp_path_factory):
    """(path of a CONTEXT-position checkpoint, path of the same weights with 512 positions)."""
    root = tmp_path_factory.mktemp("ctx")
    make_hf_checkpoint(root / "short", tie_word_embeddings=True, max_position_embeddings=CONTEXT)
    make_hf_checkpoint(root / "long", tie_word_embeddings=True, max_position_embeddings=512)
    return root / "short", root / "long"


def _free_run(long_path, ids, n):
    """The oracle's first n greedy tokens after `ids`, asserted to contain no stop token."""
    m = qwen2q.load(long_path)
    free = generate_ids(m.model, ids, SamplingParams(n), m.tokenizer.stop_ids)
    assert len(free) == n and not set(free) & set(m.tokenizer.stop_ids), "oracle stopped early: pick another prompt"
    return free


def test_generate_stops_at_context_with_a_warning(short_and_long):
    short, long = short_and_long
    m = qwen2q.load(short)
    ids = m.tokenizer.encode(PROMPT)
    room = CONTEXT - len(ids)
    with pytest.warns(ContextLimitWarning, match=f"context of {CONTEXT} tokens: {len(ids)} prompt \\+ {room} new"):
        out = m.generate_ids(PROMPT, max_new_tokens=1500)
    assert len(out) == room
    assert out == _free_run(long, ids, room)


def test_no_warning_when_it_fits_or_a_stop_token_comes_first(short_and_long):
    short, long = short_and_long
    m = qwen2q.load(short)
    ids = m.tokenizer.encode(PROMPT)
    room = CONTEXT - len(ids)
    free = _free_run(long, ids, room)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.generate_ids(PROMPT, max_new_tokens=room) == free  # exactly fills the context
        stop = free[-1]
        first = free.index(stop)
        assert generate_ids(m.model, ids, SamplingParams(1500), [stop]) == free[: first + 1]


def test_prompt_longer_than_context_is_an_error(short_and_long):
    m = qwen2q.load(short_and_long[0])
    with pytest.raises(ContextError, match=f"the prompt has {CONTEXT + 1} tokens, more than the model's context of "
                                           f"{CONTEXT}"):
        m.generate_ids([5] * (CONTEXT + 1), max_new_tokens=1)


def test_cli_generate_stops_at_context_and_warns(short_and_long):
    short, long = short_and_long
    m = qwen2q.load(long)
    ids = m.tokenizer.encode(PROMPT)
    expected = m.tokenizer.decode(_free_run(long, ids, CONTEXT - len(ids)), skip_special_tokens=True)
    r = run_cli("generate", short, "-p", PROMPT, "--max-new-tokens", "1500")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    warns = [line for line in lines if line.startswith("warning: ")]
    assert len(warns) == 1 and f"context of {CONTEXT} tokens" in warns[0], r.stderr
    assert f"{CONTEXT - len(ids)} new tokens" in lines[-1] and "Traceback" not in r.stderr


def test_cli_generate_prompt_past_context(short_and_long):
    one_line_error(run_cli("generate", short_and_long[0], "-p", "The quick brown fox jumps over the lazy dog. " * 12),
                   f"more than the model's context of {CONTEXT}")


# --- chat ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A 128-position checkpoint: its template alone takes about 60 tokens, so two exchanges overflow."""
    root = tmp_path_factory.mktemp("chat")
    make_hf_checkpoint(root, tie_word_embeddings=True, max_position_embeddings=128)
    return root


def _n_tokens(m, messages):
    return len(m.tokenizer.encode(m.tokenizer.apply_chat_template(messages)))


def test_fit_chat_drops_oldest_turns_and_keeps_the_system_message(chat_model):
    m = qwen2q.load(chat_model)
    system = {"role": "system", "content": "Be brief."}
    exchanges = [[{"role": "user", "content": f"The quick brown fox {i}"},
                  {"role": "assistant", "content": "jumps over the lazy dog."}] for i in range(6)]
    history = [system] + [msg for ex in exchanges for msg in ex] + [{"role": "user", "content": "def square(x):"}]
    kept, dropped = m.fit_chat(history, max_new_tokens=8)
    assert dropped > 0 and kept[0] == system
    assert kept[1:] == history[1 + 2 * dropped:]  # whole turns, oldest first, the latest message kept
    assert _n_tokens(m, kept) + 8 <= 128
    assert _n_tokens(m, [system] + history[1 + 2 * (dropped - 1):]) + 8 > 128  # one turn fewer would not fit
    assert m.fit_chat(kept, max_new_tokens=8) == (kept, 0)


def test_fit_chat_refuses_a_message_that_cannot_fit(chat_model):
    m = qwen2q.load(chat_model)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "The lazy dog. " * 40}]
    with pytest.raises(ContextError, match="does not fit: .* > the model's context of 128; not sent"):
        m.fit_chat(history, max_new_tokens=8)


def test_cli_chat_drops_old_turns_with_a_note(chat_model):
    m = qwen2q.load(chat_model)
    lines = ["The quick brown fox", "def square(x):", "The lazy dog"]
    # What the chat must do, exchange by exchange, worked out with the API.
    history, notes, replies = [], [], []
    for line in lines:
        history, dropped = m.fit_chat(history + [{"role": "user", "content": line}], max_new_tokens=8)
        if dropped:
            notes.append(dropped)
        replies.append(m.chat(history, max_new_tokens=8))
        history.append({"role": "assistant", "content": replies[-1]})
    assert notes, "the test needs a conversation that overflows"
    r = run_cli("chat", chat_model, "--max-new-tokens", "8", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    got = [line for line in r.stderr.splitlines() if line.startswith("note: dropped")]
    assert [int(n.split()[4]) for n in got] == notes and "context of 128 tokens" in got[0], r.stderr
    assert r.stdout == "".join(reply + "\n" for reply in replies)


def test_cli_chat_refuses_a_message_too_long_alone(chat_model):
    r = run_cli("chat", chat_model, "--max-new-tokens", "8", stdin="The lazy dog. " * 40 + "\n")
    one_line_error(r, "does not fit", "not sent")
    assert r.stdout == ""  # nothing was generated


def test_cli_chat_without_template(chat_model, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(chat_model, plain)
    cfg = (plain / "tokenizer_config.json").read_text()
    (plain / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in json.loads(cfg).items()
                                                             if k != "chat_template"}))
    one_line_error(run_cli("chat", plain, stdin="hello\n"), "no chat template")

"""Tokenizer and chat template against transformers' tokenizer on the same files."""
import json

import pytest

from qwen2q.errors import Qwen2qError
from qwen2q.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "Write a Python function that squares a number"}]


@pytest.fixture
def tok_dir(hf_tiny):
    return hf_tiny[0]


def test_encode_decode_match_transformers(tok_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tok_dir)
    ours = Tokenizer(tok_dir)
    for text in ["The quick brown fox", "def f(x):\n\treturn x ** 2  # ünïcode ✓", "<|im_start|>user\nhi<|im_end|>"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text


def test_chat_template_from_tokenizer_config_matches_transformers(tok_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    got = Tokenizer(tok_dir).apply_chat_template(MESSAGES)
    assert got == ref
    assert got.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWrite a Python" in got


def test_chat_template_jinja_file_wins(tok_dir):
    (tok_dir / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert Tokenizer(tok_dir).apply_chat_template(MESSAGES) == "[user]" + MESSAGES[0]["content"]


def test_chat_template_is_sandboxed(tok_dir):
    (tok_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception) as e:
        Tokenizer(tok_dir).apply_chat_template(MESSAGES)
    assert "unsafe" in str(e.value) or "not safely" in str(e.value) or "access to attribute" in str(e.value)


def test_stop_tokens_from_generation_config_and_eos(tok_dir):
    tok = Tokenizer(tok_dir)
    assert set(tok.stop_ids) == {0, 2}  # generation_config [2, 0]; eos <|im_end|> is id 2
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert set(Tokenizer(tok_dir).stop_ids) == {1, 2}


def test_bad_messages_rejected(tok_dir):
    with pytest.raises(Qwen2qError, match="message 0"):
        Tokenizer(tok_dir).apply_chat_template([{"content": "no role"}])

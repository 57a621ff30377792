"""Tokenizer and chat template of a checkpoint directory.

The vocabulary comes from `tokenizer.json` through the `tokenizers` library.  The chat template comes
from `chat_template.jinja` (transformers 5) or `tokenizer_config.json["chat_template"]` (older) and
is rendered in jinja2's immutable sandbox, as transformers does, so a template cannot touch Python
objects.  Stop tokens are the union of `generation_config.json`'s `eos_token_id` and the tokenizer's
eos token.
"""
from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from qwen2q.errors import Qwen2qError


def _token_text(value) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts in tokenizer_config.json."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str):
    raise TemplateError(message)


class Tokenizer:
    """Encode/decode text and render chat messages for one checkpoint."""

    def __init__(self, path: str | Path):
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise Qwen2qError(f"{path}: no tokenizer.json")
        try:
            self.backend = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise Qwen2qError(f"{tok_file}: cannot be read by tokenizers ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        self.chat_template = _read_chat_template(path, cfg)
        stop = gen.get("eos_token_id", [])
        stop = [stop] if isinstance(stop, int) else list(stop or [])
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            stop.append(self.token_to_id(self.eos_token))
        self.stop_ids = sorted(set(stop))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; Qwen2 adds no BOS, and special tokens written in the text are recognised."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) to the prompt text."""
        if self.chat_template is None:
            raise Qwen2qError("this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json)")
        check_messages(messages)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=None,
            )
        except Exception as e:  # the template is data: any failure in it (the sandbox's OverflowError too) is the user's
            detail = str(e) if isinstance(e, TemplateError) else f"{type(e).__name__}: {e}"
            raise TemplateRenderError(f"chat template failed: {detail}") from None


class MessagesError(Qwen2qError):
    """Chat messages that are not a list of {"role": str, "content": str} dicts."""


class TemplateRenderError(Qwen2qError):
    """The checkpoint's chat template does not compile or fails while rendering."""


def check_messages(messages) -> None:
    """Raise MessagesError unless `messages` is a list of dicts with string "role" and "content"."""
    if not isinstance(messages, list):
        raise MessagesError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MessagesError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                raise MessagesError(f"message {i}: {key} must be a string, got {type(m[key]).__name__} {m[key]!r}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Qwen2qError(f"{path} is not valid JSON ({e})") from None


def _read_chat_template(path: Path, cfg: dict) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template

"""Calibration tokens for AWQ: N samples x L tokens from a text source.

Sources: a local text file (`.txt`, `.utf8`, `.raw`, ...), a `.jsonl` file (records with "text" or
"messages"), a folder of such files, or a `datasets` hub id (its "text" column, when the hub is
reachable).  Text is split into documents (WikiExtractor `<doc>` blocks, else blank-line-separated
paragraphs), optionally rendered through the model's chat template (Qwen's advice for Instruct models),
joined, tokenized once and cut into consecutive blocks of L tokens, like AutoAWQ's concatenate-and-split.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from qwen2q.errors import Qwen2qError
from qwen2q.tokenizer import Tokenizer

_REPO = Path(__file__).resolve().parents[1]
_DOC = re.compile(r"<doc[^>]*>(.*?)</doc>", re.S)
TEXT_SUFFIXES = (".txt", ".utf8", ".raw", ".md", ".text")


def default_source() -> Path | None:
    """`calib/wiki.utf8` under $QWEN2Q_DATA or ../shared/data beside the checkout, when present."""
    for folder in (os.environ.get("QWEN2Q_DATA"), _REPO.parent / "shared" / "data"):
        if folder and (Path(folder) / "calib" / "wiki.utf8").is_file():
            return Path(folder) / "calib" / "wiki.utf8"
    return None


def _documents_from_text(text: str) -> list[str]:
    docs = _DOC.findall(text)
    if not docs:
        docs = re.split(r"\n\s*\n", text)
    return [d.strip() for d in docs if d.strip()]


def _documents_from_file(path: Path) -> list:
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise Qwen2qError(f"{path}:{i + 1}: not JSON ({e})") from None
            if "messages" in record:
                docs.append(record["messages"])
            elif "text" in record:
                docs.append(record["text"])
            else:
                raise Qwen2qError(f"{path}:{i + 1}: a record needs 'text' or 'messages'")
        return docs
    return _documents_from_text(path.read_text(encoding="utf-8"))


def load_documents(source: str | Path | None) -> tuple[list, str]:
    """(documents, description).  A document is a string, or a list of chat messages from jsonl."""
    if source is None:
        source = default_source()
        if source is None:
            raise Qwen2qError("no calibration data: pass --calib-data FILE|FOLDER|HUB_ID "
                              "(or set QWEN2Q_DATA to a folder with calib/wiki.utf8)")
    path = Path(source)
    if path.is_file():
        return _documents_from_file(path), str(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES + (".jsonl",))
        if not files:
            raise Qwen2qError(f"{path}: no text or jsonl files for calibration")
        return [d for f in files for d in _documents_from_file(f)], f"{path} ({len(files)} files)"
    try:
        import datasets

        rows = datasets.load_dataset(str(source), split="train")["text"]
    except Exception as e:  # hub unreachable, unknown id, no text column  # noqa: BLE001
        raise Qwen2qError(f"--calib-data {source!r} is no file or folder, and the datasets hub gave: {e}") from None
    return [r for r in rows if r and r.strip()], f"datasets: {source}"


def calibration_tokens(tokenizer: Tokenizer, source=None, n_samples: int = 128, seq_len: int = 512,
                       chat_template: bool = False) -> tuple[torch.Tensor, str]:
    """int64 [n_samples, seq_len] calibration ids and a description of where they came from.

    Documents are taken in order until n_samples * seq_len tokens are collected.
    """
    if n_samples < 1 or seq_len < 2:
        raise Qwen2qError(f"calibration needs samples >= 1 and seq len >= 2, got {n_samples} x {seq_len}")
    docs, described = load_documents(source)
    need = n_samples * seq_len
    ids: list[int] = []
    for doc in docs:
        if chat_template:
            messages = doc if isinstance(doc, list) else [{"role": "user", "content": doc}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        else:
            text = doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)
            text += "\n\n"
        ids += tokenizer.encode(text)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise Qwen2qError(f"calibration text {described} has {len(ids)} tokens; {n_samples} x {seq_len} = {need} "
                          "needed: lower --calib-samples or --calib-seq-len")
    blocks = torch.tensor(ids[:need], dtype=torch.long).view(n_samples, seq_len)
    chat = ", chat template" if chat_template else ""
    return blocks, f"{described}: {n_samples} x {seq_len} tokens{chat}"

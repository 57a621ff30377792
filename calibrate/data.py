"""Calibration tokens for AWQ: N samples x L tokens from a text source.

Sources: a local text file (`.txt`, `.utf8`, `.raw`, ...), a `.jsonl` file (records with "text" or
"messages"), a folder of such files, or a `datasets` hub id (its "text" column, when the hub is
reachable).  Reading and document splitting live in `qwen2q.textdata` (WikiExtractor `<doc>` blocks,
else blank-line-separated paragraphs); here documents are optionally rendered through the model's chat
template (Qwen's advice for Instruct models), joined, tokenized once and cut into consecutive blocks of
L tokens, like AutoAWQ's concatenate-and-split.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qwen2q import textdata
from qwen2q.errors import Qwen2qError
from qwen2q.tokenizer import Tokenizer

DEFAULT_FILE = Path("calib") / "wiki.utf8"


def default_source() -> Path | None:
    """`calib/wiki.utf8` in the data folder ($QWEN2Q_DATA, else ../shared/data beside the checkout), when present."""
    return textdata.data_file(DEFAULT_FILE)


def load_documents(source: str | Path | None) -> tuple[list, str]:
    """(documents, description).  A document is a string, or a list of chat messages from jsonl."""
    if source is None:
        source = default_source()
        if source is None:
            raise Qwen2qError(f"no calibration data: pass --calib-data FILE|FOLDER|HUB_ID (no {DEFAULT_FILE} "
                              f"under {textdata.data_folder_hint()}; set QWEN2Q_DATA to a folder with it)")
    path = Path(source)
    if path.exists():
        return textdata.read_documents(path)
    try:
        rows = textdata.hub_rows(str(source), split="train")
    except Qwen2qError as e:
        raise Qwen2qError(f"--calib-data {source!r} is no file or folder, and {e}") from None
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

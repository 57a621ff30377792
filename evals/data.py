"""Where evaluation text comes from, and which text it was.

`load_text(spec)` resolves, in this order for spec "auto":
  1. WikiText-2 raw test from a folder: $QWEN2Q_DATA or ../shared/data beside the checkout
     (`wikitext-2-raw/wiki.test.raw`, used exactly as the file is);
  2. the `datasets` hub copy (`wikitext`, `wikitext-2-raw-v1`, test), rows joined with "\\n\\n" as the
     GPTQ/AWQ papers do, when the hub is reachable;
  3. the offline fallback: CPython's `pydoc_data.topics` (present on every Python install, held out of
     the embedded model's training).
"wikitext2" means 1 or 2 and fails if neither is there; "pydoc" means 3; anything else is a path to a
text file, or a folder holding `wikitext-2-raw/wiki.test.raw` or `wiki.test.raw`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from qwen2q.errors import Qwen2qError

WIKITEXT_RAW = Path("wikitext-2-raw") / "wiki.test.raw"
_REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class EvalText:
    text: str
    name: str  # short label: "wikitext2", "pydoc-topics", or the file name
    source: str  # where exactly it came from, for reports


def pydoc_topics() -> EvalText:
    """CPython's help topics, joined with blank lines in sorted key order: offline evaluation text."""
    from pydoc_data.topics import topics

    return EvalText("\n\n".join(topics[k] for k in sorted(topics)), "pydoc-topics", "pydoc_data.topics (CPython)")


def _data_folders() -> list[Path]:
    folders = []
    if os.environ.get("QWEN2Q_DATA"):
        folders.append(Path(os.environ["QWEN2Q_DATA"]))
    folders.append(_REPO.parent / "shared" / "data")
    return folders


def _wikitext_file(folder: Path) -> Path | None:
    for candidate in (folder / WIKITEXT_RAW, folder / WIKITEXT_RAW.name):
        if candidate.is_file():
            return candidate
    return None


def _from_file(path: Path, name: str | None = None) -> EvalText:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Qwen2qError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise Qwen2qError(f"{path} is empty")
    return EvalText(text, name or path.name, f"{path} (file as is)")


def _from_hub() -> EvalText | None:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception:  # no network, no package, hub error: the caller falls back  # noqa: BLE001
        return None
    return EvalText("\n\n".join(rows), "wikitext2", "datasets: wikitext-2-raw-v1 test, rows joined with \\n\\n")


def load_text(spec: str = "auto") -> EvalText:
    """The evaluation text named by `spec` (see the module docstring)."""
    if spec in ("auto", "wikitext2"):
        for folder in _data_folders():
            f = _wikitext_file(folder)
            if f is not None:
                return _from_file(f, "wikitext2")
        hub = _from_hub()
        if hub is not None:
            return hub
        if spec == "wikitext2":
            looked = ", ".join(str(f / WIKITEXT_RAW) for f in _data_folders())
            raise Qwen2qError(f"WikiText-2 not found (looked in {looked} and the datasets hub); "
                              "set QWEN2Q_DATA, pass --dataset PATH, or use --dataset pydoc")
        return pydoc_topics()
    if spec == "pydoc":
        return pydoc_topics()
    path = Path(spec)
    if path.is_dir():
        f = _wikitext_file(path)
        if f is None:
            raise Qwen2qError(f"{path} is a folder without {WIKITEXT_RAW} or {WIKITEXT_RAW.name}; give a text file")
        return _from_file(f, "wikitext2")
    if path.is_file():
        return _from_file(path)
    raise Qwen2qError(f"--dataset {spec!r}: not 'auto', 'wikitext2', 'pydoc', nor an existing file or folder")

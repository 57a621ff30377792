"""Where evaluation text comes from, and which text it was.

`load_text(spec)` resolves, in this order for spec "auto":
  1. WikiText-2 raw test from the data folder ($QWEN2Q_DATA, else ../shared/data beside the checkout;
     see `qwen2q.textdata.data_folder`): `wikitext-2-raw/wiki.test.raw`, used exactly as the file is;
  2. the `datasets` hub copy (`wikitext`, `wikitext-2-raw-v1`, test), rows joined with "\\n\\n" as the
     GPTQ/AWQ papers do, when the hub is reachable (decided once, quickly: `qwen2q.textdata.hub_unavailable`);
  3. the offline fallback: CPython's `pydoc_data.topics` (present on every Python install, held out of
     the embedded model's training), announced in one line on stderr.
"wikitext2" means 1 or 2 and fails if neither is there; "pydoc" means 3; anything else is a path to a
text file, or a folder holding `wikitext-2-raw/wiki.test.raw` or `wiki.test.raw`.
Files are read through `datasets` (`qwen2q.textdata.read_text_file`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from qwen2q import textdata
from qwen2q.errors import Qwen2qError

WIKITEXT_RAW = Path("wikitext-2-raw") / "wiki.test.raw"


@dataclasses.dataclass(frozen=True)
class EvalText:
    text: str
    name: str  # short label: "wikitext2", "pydoc-topics", or the file name
    source: str  # where exactly it came from, for reports


def pydoc_topics() -> EvalText:
    """CPython's help topics, joined with blank lines in sorted key order: offline evaluation text."""
    from pydoc_data.topics import topics

    return EvalText("\n\n".join(topics[k] for k in sorted(topics)), "pydoc-topics", "CPython's pydoc_data.topics")


def _data_folders() -> list[Path]:
    """The folders searched for WikiText-2: the one data folder, when there is one."""
    folder = textdata.data_folder()
    return [folder] if folder is not None else []


def _wikitext_file(folder: Path) -> Path | None:
    for candidate in (folder / WIKITEXT_RAW, folder / WIKITEXT_RAW.name):
        if candidate.is_file():
            return candidate
    return None


def _from_file(path: Path, name: str | None = None) -> EvalText:
    text = textdata.read_text_file(path)
    if not text.strip():
        raise Qwen2qError(f"{path} is empty")
    return EvalText(text, name or path.name, f"{path} (file as is)")


def _from_hub() -> tuple[EvalText | None, str]:
    """(the hub's WikiText-2 test text, "") or (None, why it is not available)."""
    try:
        rows = textdata.hub_rows("wikitext", "wikitext-2-raw-v1", split="test")
    except Qwen2qError as e:
        return None, str(e)
    return EvalText("\n\n".join(rows), "wikitext2", "datasets: wikitext-2-raw-v1 test, rows joined with \\n\\n"), ""


def load_text(spec: str = "auto") -> EvalText:
    """The evaluation text named by `spec` (see the module docstring)."""
    if spec in ("auto", "wikitext2"):
        for folder in _data_folders():
            f = _wikitext_file(folder)
            if f is not None:
                return _from_file(f, "wikitext2")
        hub, why = _from_hub()
        if hub is not None:
            return hub
        missing = f"no {WIKITEXT_RAW} under {textdata.data_folder_hint()}, and {why}"
        if spec == "wikitext2":
            raise Qwen2qError(f"WikiText-2 not found: {missing}; "
                              "set QWEN2Q_DATA, pass --dataset PATH, or use --dataset pydoc")
        fallback = pydoc_topics()
        textdata.notice(f"{missing}; evaluating on {fallback.name} ({fallback.source}) instead")
        return fallback
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

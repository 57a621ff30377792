"""Where qwen2q's text comes from: the data folder, local text read through `datasets`, and the hub.

One module owns the three questions calibration (`qwen2q.calibrate.data`) and evaluation
(`qwen2q.evals.data`) both ask:

* **The data folder** (`data_folder()`): $QWEN2Q_DATA when set, else `../shared/data` beside the
  repository checkout.  The sibling is only looked for when this file runs from a checkout (a
  `setup.cfg` next to the `qwen2q/` folder); an installed wheel has no such sibling and gets None.
* **Local text** (`read_text_file`, `read_jsonl`, `read_documents`): files go through
  `datasets.load_dataset("text", sample_by="document")` (the whole file as one row, read in text mode
  exactly as `Path.read_text` reads it) or `load_dataset("json")` for `.jsonl`, kept in memory with a
  throw-away cache folder, so nothing accumulates under ~/.cache/huggingface.  Documents are
  WikiExtractor `<doc>` blocks, else blank-line-separated paragraphs; `datasets`' own
  `sample_by="paragraph"` splits on "\\n\\n" only, so the split stays here.
* **The hub** (`hub_unavailable`, `hub_rows`): used only when reachable.  "Not reachable" is decided
  once per process, without retries: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or a 2-second probe of
  $HF_ENDPOINT that gets no HTTP answer.

`datasets` is imported inside functions only, so `qwen2q --help` never loads it.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import re
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from qwen2q.errors import Qwen2qError

_CHECKOUT = Path(__file__).resolve().parents[1]
_DOC = re.compile(r"<doc[^>]*>(.*?)</doc>", re.S)
TEXT_SUFFIXES = (".txt", ".utf8", ".raw", ".md", ".text")
JSONL_SUFFIX = ".jsonl"
HUB_PROBE_SECONDS = 2.0
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub and datasets accept as "set"


# --- the data folder ---------------------------------------------------------------------------

def _checkout_sibling() -> Path | None:
    """`../shared/data` beside the repository root, when this module runs from a checkout."""
    if not ((_CHECKOUT / "setup.cfg").is_file() and (_CHECKOUT / "qwen2q" / Path(__file__).name).is_file()):
        return None  # an installed package: site-packages has no ../shared/data of ours
    return _CHECKOUT.parent / "shared" / "data"


def data_folder() -> Path | None:
    """The shared data folder: $QWEN2Q_DATA when set (None if it is not a folder), else
    ../shared/data beside the checkout when it exists, else None."""
    env = os.environ.get("QWEN2Q_DATA")
    folder = Path(env).expanduser() if env else _checkout_sibling()
    return folder if folder is not None and folder.is_dir() else None


def data_file(relative: str | Path) -> Path | None:
    """`relative` (e.g. "calib/wiki.utf8") inside the data folder, when that file exists."""
    folder = data_folder()
    if folder is None or not (folder / relative).is_file():
        return None
    return folder / relative


def data_folder_hint() -> str:
    """Where the data folder was looked for, for error messages."""
    env = os.environ.get("QWEN2Q_DATA")
    if env:
        return f"QWEN2Q_DATA={env}"
    sibling = _checkout_sibling()
    return f"{sibling} (QWEN2Q_DATA unset)" if sibling else "QWEN2Q_DATA (unset; not running from a checkout)"


# --- local text through datasets -----------------------------------------------------------------

@contextlib.contextmanager
def _quiet_datasets():
    """`datasets`, quiet and offline for local files: no progress bars or log lines, and no
    download-count ping (load_dataset otherwise sends a HEAD request per call, up to 3 s when the
    network is black-holed).  The settings are restored afterwards."""
    import datasets

    counts, bars_off = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # parse errors become our one-line errors
    try:
        yield datasets
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
        datasets.logging.set_verbosity(verbosity)
        if not bars_off:
            datasets.enable_progress_bars()


def _load_local(builder: str, path: Path, **config) -> list[dict]:
    """The rows of one local file through `load_dataset(builder, data_files=path)`, kept in memory.

    The Arrow files `datasets` writes go to a throw-away cache folder, so nothing accumulates under
    ~/.cache/huggingface.  (Streaming would write no Arrow file, but it imports torch, 2 s on a cold start.)
    """
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="qwen2q-datasets-") as cache:
        # data_files are glob patterns: escape "[", "*" and "?" so the file is read by its exact name
        rows = datasets.load_dataset(builder, data_files=glob.escape(str(path)), split="train",
                                     keep_in_memory=True, cache_dir=cache, **config)
        return rows.to_list()


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def _caused_by(error: BaseException, kind: type) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


def read_text_file(path: str | Path) -> str:
    """The whole of one UTF-8 text file, read by `load_dataset("text", sample_by="document")`.

    Text mode with universal newlines, as `Path.read_text` reads it, so the result is the same string.
    """
    path = Path(path)
    try:
        rows = _load_local("text", path, sample_by="document")
    except Exception as e:  # noqa: BLE001 - a decoding error may arrive wrapped in datasets' own errors
        if _caused_by(e, UnicodeDecodeError):
            raise Qwen2qError(f"{path} is not UTF-8 text") from None
        raise
    return "".join(row["text"] for row in rows)


def _bad_jsonl_line(path: Path) -> str | None:
    """The first line `json.loads` refuses or that is no record with "text" or "messages"."""
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}:{i + 1}: not JSON ({e})"
        if not isinstance(record, dict) or not ({"text", "messages"} & record.keys()):
            return f"{path}:{i + 1}: a record needs 'text' or 'messages'"
    return None


def read_jsonl(path: str | Path) -> list:
    """The records of a `.jsonl` file, read by `load_dataset("json")`: each is its "messages" (a list of
    {"role", "content", ...} dicts) when present, else its "text"."""
    path = Path(path)
    try:
        rows = _load_local("json", path)
    except Exception as e:  # noqa: BLE001 - pyarrow's parse errors name no line; find it below
        if _caused_by(e, UnicodeDecodeError):
            raise Qwen2qError(f"{path} is not UTF-8 text") from None
        bad = _bad_jsonl_line(path)
        if bad is None and not path.read_text(encoding="utf-8").strip():
            return []  # no records at all (pyarrow finds no schema to infer)
        raise Qwen2qError(bad or f"{path}: not JSON lines ({_first_line(e)})") from None
    docs = []
    for i, row in enumerate(rows):
        if row.get("messages") is not None:
            # Arrow gives every message every key seen in the file; drop the ones this message lacked.
            docs.append([{k: v for k, v in m.items() if v is not None} for m in row["messages"]])
        elif row.get("text") is not None:
            docs.append(row["text"])
        else:
            raise Qwen2qError(_bad_jsonl_line(path) or f"{path}: record {i + 1} needs 'text' or 'messages'")
    return docs


def split_documents(text: str) -> list[str]:
    """WikiExtractor `<doc ...>...</doc>` blocks, else blank-line-separated paragraphs; stripped, non-empty."""
    docs = _DOC.findall(text)
    if not docs:
        docs = re.split(r"\n\s*\n", text)
    return [d.strip() for d in docs if d.strip()]


def _file_documents(path: Path) -> list:
    if path.suffix == JSONL_SUFFIX:
        return read_jsonl(path)
    return split_documents(read_text_file(path))


def read_documents(path: str | Path) -> tuple[list, str]:
    """(documents, description) of a text/jsonl file, or of a folder's text and jsonl files in name order.

    A document is a string, or a list of chat messages from a jsonl "messages" record.
    """
    path = Path(path)
    if path.is_file():
        return _file_documents(path), str(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES + (JSONL_SUFFIX,))
        if not files:
            raise Qwen2qError(f"{path}: no text ({', '.join(TEXT_SUFFIXES)}) or {JSONL_SUFFIX} files")
        return [d for f in files for d in _file_documents(f)], f"{path} ({len(files)} files)"
    raise Qwen2qError(f"{path}: no such file or folder")


# --- the hub -----------------------------------------------------------------------------------

def hub_endpoint() -> str:
    """The hub's address: $HF_ENDPOINT, else https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str, seconds: float) -> str | None:
    """None when `endpoint` answers HTTP within `seconds`, else why not.  In a thread, because name
    resolution ignores socket timeouts; one try, no retries."""
    outcome: list[str | None] = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=seconds).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # it answered: reachable
        except Exception as e:  # noqa: BLE001 - refused, unresolvable, TLS, timeout: all mean "not here"
            outcome.append(str(getattr(e, "reason", e)))

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else f"no answer within {seconds:g} s"


def hub_unavailable() -> str | None:
    """None when the hub may be used, else a short reason (offline variable set, or the probe failed).
    Decided once per process and endpoint."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var} is set"
    endpoint = hub_endpoint()
    why = _probe(endpoint, HUB_PROBE_SECONDS)
    return None if why is None else f"{endpoint} unreachable: {why}"


def hub_rows(name: str, config: str | None = None, split: str = "train", column: str = "text") -> list[str]:
    """The `column` of a hub dataset's split; raises Qwen2qError when the hub is unavailable or refuses."""
    why = hub_unavailable()
    if why is not None:
        raise Qwen2qError(f"the Hugging Face hub is not available ({why})")
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)[column]
    except Exception as e:  # noqa: BLE001 - unknown id, no such column, network trouble mid-way
        raise Qwen2qError(f"datasets hub {name!r}: {_first_line(e)}") from None


def notice(message: str) -> None:
    """One line on stderr about which text is used, e.g. after a fallback."""
    print(f"qwen2q: {message}", file=sys.stderr, flush=True)

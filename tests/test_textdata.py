"""qwen2q.textdata: the data-folder lookup, local text through `datasets`, and the hub only when reachable."""
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen2q import textdata
from qwen2q.errors import Qwen2qError

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once
ASSETS = Path(textdata.__file__).parent / "assets" / "qwen2-tiny"


def _unreachable_hub_env(**extra) -> dict:
    """This environment, with the hub at a closed local port and no offline variable set."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    return {**env, "HF_ENDPOINT": CLOSED_PORT, **extra}


# --- the data folder ---------------------------------------------------------------------------

def _fake_checkout(root: Path) -> Path:
    """A checkout layout (setup.cfg beside qwen2q/textdata.py) with an empty shared/data sibling."""
    (root / "repo" / "qwen2q").mkdir(parents=True)
    (root / "repo" / "setup.cfg").write_text("[metadata]\n")
    (root / "repo" / "qwen2q" / "textdata.py").write_text("")
    (root / "shared" / "data" / "calib").mkdir(parents=True)
    (root / "shared" / "data" / "calib" / "wiki.utf8").write_text("x")
    return root / "repo"


def test_data_folder_is_qwen2q_data_when_set(tmp_path, monkeypatch):
    monkeypatch.setattr(textdata, "_CHECKOUT", _fake_checkout(tmp_path / "co"))
    monkeypatch.setenv("QWEN2Q_DATA", str(tmp_path))
    assert textdata.data_folder() == tmp_path
    assert textdata.data_file("calib/wiki.utf8") is None  # only QWEN2Q_DATA is looked in
    monkeypatch.setenv("QWEN2Q_DATA", str(tmp_path / "absent"))
    assert textdata.data_folder() is None and "absent" in textdata.data_folder_hint()


def test_data_folder_is_the_checkout_sibling_without_qwen2q_data(tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN2Q_DATA", raising=False)
    monkeypatch.setattr(textdata, "_CHECKOUT", _fake_checkout(tmp_path))
    assert textdata.data_folder() == tmp_path / "shared" / "data"
    assert textdata.data_file("calib/wiki.utf8") == tmp_path / "shared" / "data" / "calib" / "wiki.utf8"


def test_an_installed_package_has_no_sibling(tmp_path, monkeypatch):
    """In site-packages there is no setup.cfg beside qwen2q/, so ../shared/data is not even looked for."""
    monkeypatch.delenv("QWEN2Q_DATA", raising=False)
    site = tmp_path / "site-packages"
    (site / "qwen2q").mkdir(parents=True)
    (tmp_path / "shared" / "data").mkdir(parents=True)  # would be found, were this a checkout
    monkeypatch.setattr(textdata, "_CHECKOUT", site)
    assert textdata.data_folder() is None
    assert "not running from a checkout" in textdata.data_folder_hint()


# --- local text through datasets -----------------------------------------------------------------

def test_text_file_reads_as_path_read_text(tmp_path):
    f = tmp_path / "a.raw"
    f.write_bytes(" = T = \r\n line\n\n\n tail \n é \n".encode())
    assert textdata.read_text_file(f) == f.read_text(encoding="utf-8")
    (tmp_path / "b[1]*.txt").write_text("glob characters in the name\n")
    (tmp_path / "b1x.txt").write_text("a file the unescaped pattern would match\n")
    assert textdata.read_text_file(tmp_path / "b[1]*.txt") == "glob characters in the name\n"
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(Qwen2qError, match="latin.txt is not UTF-8 text"):
        textdata.read_text_file(tmp_path / "latin.txt")


def test_documents_split_on_doc_blocks_else_blank_lines(tmp_path):
    (tmp_path / "b.txt").write_text('<doc id="1">\nFirst\n\nstill first\n</doc>\n<doc id="2"> second </doc>\n')
    (tmp_path / "a.utf8").write_text("one\n \t\ntwo\n\n\n\nthree\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "four"}) + "\n")
    (tmp_path / "skip.csv").write_text("not,read\n")
    docs, described = textdata.read_documents(tmp_path)
    assert docs == ["one", "two", "three", "First\n\nstill first", "second", "four"]
    assert described == f"{tmp_path} (3 files)"
    assert textdata.read_documents(tmp_path / "b.txt") == (["First\n\nstill first", "second"], str(tmp_path / "b.txt"))


def test_empty_folder_and_missing_path_are_user_errors(tmp_path):
    with pytest.raises(Qwen2qError, match=r"no text \(.txt"):
        textdata.read_documents(tmp_path)
    with pytest.raises(Qwen2qError, match="no such file or folder"):
        textdata.read_documents(tmp_path / "absent")


def test_jsonl_records_text_or_messages(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([
        json.dumps({"text": "plain one"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello", "name": "bot"}]}),
        "",
        json.dumps({"text": "plain two", "extra": 3}),
    ]) + "\n")
    assert textdata.read_jsonl(f) == [
        "plain one",
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "name": "bot"}],
        "plain two",
    ]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert textdata.read_jsonl(tmp_path / "empty.jsonl") == []


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": broken}'], r"bad.jsonl:2: not JSON"),
    (['{"text": "ok"}', '{"other": 1}'], r"bad.jsonl:2: a record needs 'text' or 'messages'"),
    (['{"text": "ok"}', '[1, 2]'], r"bad.jsonl:2: a record needs 'text' or 'messages'"),
])
def test_jsonl_errors_name_the_line(tmp_path, capfd, lines, message):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(Qwen2qError, match=message):
        textdata.read_jsonl(tmp_path / "bad.jsonl")
    assert capfd.readouterr().err == ""  # datasets' own log lines are silenced


def test_local_reads_write_no_datasets_cache(tmp_path):
    """Local reads leave nothing under the datasets cache (no Arrow files, no locks): repeated runs cannot grow it."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "in" / "b.jsonl").write_text('{"text": "three"}\n')
    code = f"from qwen2q import textdata; print(textdata.read_documents({str(tmp_path / 'in')!r})[0])"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "ds")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['one', 'two', 'three']"
    written = [p for p in (tmp_path / "hf").rglob("*") if p.is_file()] if (tmp_path / "hf").exists() else []
    assert written == []


def test_help_does_not_import_datasets():
    code = ("import sys\nfrom qwen2q import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('datasets' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("False")


# --- the hub -----------------------------------------------------------------------------------

def test_offline_variables_mean_no_hub_without_probing(monkeypatch):
    monkeypatch.setattr(textdata, "_probe", lambda *a: pytest.fail("probed although offline"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert textdata.hub_unavailable() == "HF_DATASETS_OFFLINE is set"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert textdata.hub_unavailable() == "HF_HUB_OFFLINE is set"


def test_unreachable_hub_is_decided_once_and_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    textdata._probe.cache_clear()
    start = time.perf_counter()
    why = textdata.hub_unavailable()
    assert why is not None and CLOSED_PORT in why
    assert textdata.hub_unavailable() == why and textdata._probe.cache_info().hits >= 1
    with pytest.raises(Qwen2qError, match="hub is not available"):
        textdata.hub_rows("wikitext", "wikitext-2-raw-v1", split="test")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_falls_back_in_one_line(tmp_path):
    """No WikiText-2 in the data folder, no offline variable, the hub at a closed port: pydoc topics at
    once (the old code retried for 23-27 s and printed eleven lines), announced in one line."""
    code = ("import time; from qwen2q.evals.data import load_text\n"
            "t = time.perf_counter(); text = load_text('auto')\n"
            "print(text.name, round(time.perf_counter() - t, 2))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=_unreachable_hub_env(QWEN2Q_DATA=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    name, seconds = r.stdout.split()
    assert name == "pydoc-topics" and float(seconds) < 5
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "pydoc-topics" in lines[0] and CLOSED_PORT in lines[0], r.stderr


def test_calibration_hub_id_with_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    from qwen2q.calibrate.data import load_documents

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    start = time.perf_counter()
    with pytest.raises(Qwen2qError, match=r"'someone/corpus' is no file or folder, and the Hugging Face hub"):
        load_documents("someone/corpus")
    assert time.perf_counter() - start < 5


def test_cli_eval_with_unreachable_hub_is_fast_and_says_which_text(tmp_path):
    """`qwen2q eval` with the hub at a closed port (no offline variable) takes about as long as with
    HF_HUB_OFFLINE=1, and says in one line which text it uses.  The old code's retries slept 23 s."""
    cli = Path(sys.executable).parent / "qwen2q"
    cmd = ([str(cli)] if cli.is_file() else [sys.executable, "-m", "qwen2q.cli"]) + [
        "eval", "--max-windows", "1", "--seq-len", "64"]
    seconds = {}
    for name, env in (("offline", {**_unreachable_hub_env(QWEN2Q_DATA=str(tmp_path)), "HF_HUB_OFFLINE": "1"}),
                      ("closed port", _unreachable_hub_env(QWEN2Q_DATA=str(tmp_path)))):
        start = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
        seconds[name] = time.perf_counter() - start
        assert r.returncode == 0, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and "evaluating on pydoc-topics" in lines[0], r.stderr
        assert "pydoc-topics (CPython's pydoc_data.topics): seq len 64, 1 window," in r.stdout
    assert CLOSED_PORT in lines[0]
    assert seconds["closed port"] < seconds["offline"] + 10, seconds


# --- byte identity with the shared data -----------------------------------------------------------

def _shared(relative: str) -> Path:
    f = textdata.data_file(relative)
    if f is None:
        pytest.skip(f"{relative} not in the data folder ({textdata.data_folder_hint()})")
    return f


def test_wikitext_eval_text_is_the_file_byte_for_byte():
    from qwen2q.evals.data import load_text

    raw = _shared("wikitext-2-raw/wiki.test.raw")
    text = load_text("auto")
    assert text.name == "wikitext2" and str(raw) in text.source
    assert text.text.encode("utf-8") == raw.read_bytes()
    assert hashlib.sha256(text.text.encode()).hexdigest().startswith("173c87a53759e020")  # shared/data/README.md


def test_default_calibration_ids_are_unchanged():
    """48 x 512 ids of calib/wiki.utf8 with the embedded tokenizer, against a plain re-implementation of
    the rules: read the file, <doc> blocks else blank-line paragraphs, each + "\\n\\n", tokenize, cut."""
    from tokenizers import Tokenizer as HFTokenizer

    from qwen2q.calibrate.data import calibration_tokens
    from qwen2q.tokenizer import Tokenizer

    wiki = _shared("calib/wiki.utf8")
    text = wiki.read_text(encoding="utf-8")
    docs = re.findall(r"<doc[^>]*>(.*?)</doc>", text, re.S) or re.split(r"\n\s*\n", text)
    backend = HFTokenizer.from_file(str(ASSETS / "tokenizer.json"))
    expected: list[int] = []
    for doc in (d.strip() for d in docs):
        if doc:
            expected += backend.encode(doc + "\n\n", add_special_tokens=False).ids
        if len(expected) >= 48 * 512:
            break
    ids, described = calibration_tokens(Tokenizer(ASSETS), None, n_samples=48, seq_len=512)
    assert ids.shape == (48, 512) and ids.flatten().tolist() == expected[:48 * 512]
    assert described == f"{wiki}: 48 x 512 tokens"


def test_calibration_from_jsonl_messages_through_the_chat_template(tmp_path):
    from qwen2q.calibrate.data import calibration_tokens
    from qwen2q.tokenizer import Tokenizer

    tok = Tokenizer(ASSETS)
    chats = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
             for i in range(40)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    expected: list[int] = []
    for m in chats:
        expected += tok.encode(tok.apply_chat_template(m, add_generation_prompt=False))
    ids, described = calibration_tokens(tok, tmp_path, n_samples=4, seq_len=32, chat_template=True)
    assert ids.flatten().tolist() == expected[:128]
    assert described == f"{tmp_path} (1 files): 4 x 32 tokens, chat template"


def test_demo_with_unreachable_hub_falls_back_and_says_so(tmp_path):
    """`qwen2q demo` without the offline variable and with the hub unreachable: no retries, one line
    naming the fallback text, and the table.  (No data folder: AWQ is skipped and says why.)"""
    r = subprocess.run([sys.executable, "-m", "qwen2q.cli", "demo", "--max-windows", "1"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300, env=_unreachable_hub_env(QWEN2Q_DATA=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        line for line in r.stderr.splitlines() if "evaluating on pydoc-topics" in line] and CLOSED_PORT in r.stderr
    assert "awq skipped: no calibration text" in r.stdout and "pydoc-topics" in r.stdout

"""Opt-in checks on the real Qwen2.5-Coder-0.5B-Instruct (`pytest -m real`).

Build it once with `../shared/tools/real-qwen2-0.5b.sh DIR .venv/bin/python` and point
QWEN2Q_REAL_MODEL at DIR.  The WikiText-2 file comes from QWEN2Q_DATA or ../shared/data.
"""
import os
from pathlib import Path

import pytest
import torch

from conftest import shared_data

pytestmark = pytest.mark.real
REAL = os.environ.get("QWEN2Q_REAL_MODEL")
WINDOWS, SEQ_LEN = 32, 512


@pytest.fixture(scope="module")
def real_dir():
    if not REAL or not (Path(REAL) / "config.json").is_file():
        pytest.skip("set QWEN2Q_REAL_MODEL to a Qwen2.5-Coder-0.5B-Instruct checkpoint directory")
    return Path(REAL)


@pytest.fixture(scope="module")
def wikitext_ids(real_dir):
    data = shared_data()
    if data is None or not (data / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip("WikiText-2 raw test file not found (QWEN2Q_DATA or ../shared/data)")
    from qwen2q.tokenizer import Tokenizer

    text = (data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    return torch.tensor(Tokenizer(real_dir).encode(text))  # the whole file, tokenized once


def test_bf16_perplexity_matches_transformers(real_dir, wikitext_ids):
    from transformers import AutoModelForCausalLM

    import qwen2q
    from qwen2q.evals.perplexity import perplexity

    assert wikitext_ids.numel() >= WINDOWS * SEQ_LEN
    ours = qwen2q.load(real_dir, dtype="bfloat16").model
    got = perplexity(ours, wikitext_ids, SEQ_LEN, max_windows=WINDOWS, batch_size=1)
    del ours
    hf = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.bfloat16).eval()
    ref = perplexity(lambda ids: hf(ids).logits, wikitext_ids, SEQ_LEN, max_windows=WINDOWS, batch_size=1)
    print(f"\nqwen2q bf16 ppl {got['ppl']:.4f}, transformers bf16 ppl {ref['ppl']:.4f} "
          f"({got['windows']} windows x {SEQ_LEN}, {got['tokens']} scored tokens)")
    assert abs(got["ppl"] / ref["ppl"] - 1) < 0.005


def test_chat_answers_the_square_function_question(real_dir):
    import qwen2q

    m = qwen2q.load(real_dir)
    reply = m.chat([{"role": "user", "content": "Write a Python function that squares a number"}], max_new_tokens=96)
    print("\n" + reply)
    assert "def " in reply and "return" in reply
    assert "** 2" in reply or "**2" in reply or "* number" in reply or "* x" in reply

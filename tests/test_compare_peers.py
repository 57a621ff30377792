"""evals.compare_peers on a tiny random bf16 checkpoint: every row runs (or says why not), same-format rows agree."""
import json
import math
import sys

import pytest
import torch

from conftest import make_hf_checkpoint
from qwen2q.evals import compare_peers

pytest.importorskip("transformers")

SMALL = ["--dataset", "pydoc", "--seq-len", "64", "--max-windows", "2"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    make_hf_checkpoint(path, dtype=torch.bfloat16, tie_word_embeddings=True, seed=3)
    return path


def _run(src, tmp_path, *extra):
    out = tmp_path / "peers.json"
    rc = compare_peers.main([str(src), *SMALL, "--json", str(out), "--work-dir", str(tmp_path / "work"), *extra])
    return rc, json.loads(out.read_text())


def test_all_rows_side_by_side(src, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    rc, result = _run(src, tmp_path)
    assert rc == 0
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["reference", *compare_peers.ROWS]
    for name in ("reference", "transformers-bf16", "qwen2q-nf4", "bnb-nf4", "qwen2q-int8", "bnb-int8", "qwen2q-int4-g128"):
        assert rows[name]["status"] == "ok", rows[name]
    awq = rows["qwen2q-awq-g128"]["status"]
    from conftest import shared_data

    assert awq == "ok" if shared_data() else awq != "ok", awq  # calibrates on ../shared/data/calib
    assert rows["autoawq-g128"]["status"].startswith("not available: opt-in")

    ref = rows["reference"]["ppl"]
    for r in rows.values():
        if r["status"] == "ok" and r["row"] != "reference":
            assert math.isclose(r["ppl_reference"], ref, rel_tol=1e-9)  # one reference, replayed
    assert rows["transformers-bf16"]["kl"] < 1e-4  # the two bf16 implementations agree
    # Same format, bit-identical weights: same storage and the same drift.
    assert rows["qwen2q-nf4"]["bits_per_weight"] == rows["bnb-nf4"]["bits_per_weight"]
    assert rows["qwen2q-int8"]["bits_per_weight"] == rows["bnb-int8"]["bits_per_weight"]
    assert rows["qwen2q-int4-g128"]["bits_per_weight"] == pytest.approx(4 + 4 / 128 + 16 / 128)
    assert abs(rows["qwen2q-nf4"]["kl"] - rows["bnb-nf4"]["kl"]) <= 1e-3
    assert rows["qwen2q-nf4"]["kl"] == pytest.approx(rows["bnb-nf4"]["kl"], rel=0.1)

    s = result["settings"]
    assert (s["seq_len"], s["windows"], s["scored_tokens"]) == (64, 2, 126)
    assert {"torch", "transformers", "bitsandbytes", "autoawq"} <= set(s["versions"])
    table = capsys.readouterr().out
    assert "transformers+bnb nf4" in table and "not available" in table and "AVX512-BF16" in table


def test_missing_peer_is_reported_not_fatal(src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    rc, result = _run(src, tmp_path, "--only", "bnb-nf4,qwen2q-int8")
    assert rc == 0
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["bnb-nf4"]["status"].startswith("not available") and "bitsandbytes" in rows["bnb-nf4"]["status"]
    assert rows["qwen2q-int8"]["status"] == "ok"


def test_unknown_row_is_refused(src):
    with pytest.raises(SystemExit):
        compare_peers.main([str(src), "--only", "qwen2q-nf5"])


@pytest.mark.slow
def test_autoawq_row(src, tmp_path):
    """AutoAWQ quantizes (fp32, calibrated) and qwen2q runs its checkpoint: same layout as qwen2q int4."""
    pytest.importorskip("awq")
    from pydoc_data.topics import topics

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    rc, result = _run(src, tmp_path, "--only", "qwen2q-int4-g128,autoawq-g128", "--with-autoawq",
                      "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "64")
    assert rc == 0
    rows = {r["row"]: r for r in result["rows"]}
    awq, rtn = rows["autoawq-g128"], rows["qwen2q-int4-g128"]
    assert awq["status"] == "ok", awq
    assert awq["bits_per_weight"] == rtn["bits_per_weight"]
    assert awq["kl"] < 2 * rtn["kl"]  # calibrated scales should not do much worse than round to nearest

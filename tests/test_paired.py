"""dev paired: gaps between two compare_peers rows, checked against a float64 computation done here."""
import json
import math

import torch

from conftest import FixedLogits
from dev_modules import exit_status
from qwen2q_dev.research import paired
from qwen2q.evals.drift import compare


def _result(path, ref, cand, ids, L, name, windows=None):
    d = compare(FixedLogits(ref), FixedLogits(cand), ids, L)
    settings = {"dataset": "synthetic", "seq_len": L, "windows": windows or d["windows"], "text_tokens": ids.numel()}
    row = {"row": name, "label": name, "status": "ok", **d}
    path.write_text(json.dumps({"settings": settings, "rows": [{"row": "reference", "status": "ok"}, row]}))
    return d


def _fixture(tmp_path):
    g = torch.Generator().manual_seed(3)
    V, L, W = 9, 6, 12
    ref = torch.randn(W, L, V, generator=g, dtype=torch.float64)
    a = ref + 0.2 * torch.randn(W, L, V, generator=g, dtype=torch.float64)
    b = ref + 0.8 * torch.randn(W, L, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (W * L,), generator=g)
    da = _result(tmp_path / "a.json", ref, a, ids, L, "row-a")
    db = _result(tmp_path / "b.json", ref, b, ids, L, "row-b")
    return ref, a, b, ids, L, W, da, db


def test_gap_and_interval_match_a_float64_computation(tmp_path):
    ref, a, b, ids, L, W, da, db = _fixture(tmp_path)
    rows = [paired.load_row(str(tmp_path / "a.json")), paired.load_row(str(tmp_path / "b.json:row-b"))]
    (gap,) = paired.compare_rows(rows)

    def window_nll(logits, w):
        t = ids[w * L + 1 : (w + 1) * L]
        return -logits[w, :-1].log_softmax(-1)[torch.arange(L - 1), t].mean().item()

    d = [window_nll(b, w) - window_nll(a, w) for w in range(W)]
    mean = sum(d) / W
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (W - 1) / W)
    ppl_a = math.exp(sum(window_nll(a, w) for w in range(W)) / W)
    assert math.isclose(gap["ppl_gap"], db["ppl"] - da["ppl"], rel_tol=1e-9)
    assert math.isclose(gap["ppl_gap"], ppl_a * math.expm1(mean), rel_tol=1e-4)
    lo, hi = gap["ppl_gap_ci95"]
    assert math.isclose(lo, ppl_a * math.expm1(mean - 1.96 * se), rel_tol=1e-4)
    assert math.isclose(hi, ppl_a * math.expm1(mean + 1.96 * se), rel_tol=1e-4)
    assert gap["resolved"] == (not lo <= 0 <= hi)
    assert math.isclose(gap["kl_gap"], db["kl"] - da["kl"], rel_tol=1e-9)


def test_a_row_scored_on_other_windows_is_refused(tmp_path, capsys):
    ref, a, b, ids, L, W, da, db = _fixture(tmp_path)
    _result(tmp_path / "c.json", ref, b, ids, L, "row-c", windows=W - 1)
    assert exit_status(paired.main, [str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "windows" in err


def test_cli_prints_the_table_and_names_missing_rows(tmp_path, capsys):
    _fixture(tmp_path)
    assert exit_status(paired.main, [str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "row-b" in out and "95% ci" in out
    assert len(json.loads((tmp_path / "g.json").read_text())) == 1
    assert exit_status(paired.main, [str(tmp_path / "a.json:nope"), str(tmp_path / "b.json")]) == 1
    assert "name one scored row" in capsys.readouterr().err


def test_first_windows_give_the_figures_of_a_shorter_run(tmp_path):
    g = torch.Generator().manual_seed(4)
    V, L, W = 8, 5, 6
    ref = torch.randn(W, L, V, generator=g, dtype=torch.float64)
    cand = ref + 0.4 * torch.randn(W, L, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (W * L,), generator=g)
    _result(tmp_path / "long.json", ref, cand, ids, L, "long")
    short = compare(FixedLogits(ref), FixedLogits(cand), ids, L, max_windows=4)  # the run --max-windows 4 makes
    got = paired.first_windows(paired.load_row(str(tmp_path / "long.json")), 4)
    for key in ("ppl", "ppl_reference", "ppl_delta", "kl", "ppl_delta_se"):
        assert math.isclose(got[key], short[key], rel_tol=1e-9, abs_tol=1e-12), key
    assert got["settings"]["windows"] == 4 and len(got["window_kl"]) == 4
    assert exit_status(paired.main, [str(tmp_path / "long.json"), str(tmp_path / "long.json"), "--first", "7"]) == 1

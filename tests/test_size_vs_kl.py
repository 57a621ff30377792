"""dev size-vs-kl: the two mixed-precision questions read off an eval result, checked by hand here."""
import json
import math

from dev_modules import exit_status
from qwen2q_dev.research import size_vs_kl

MIB = 2**20


def _eval(tmp_path, rows, name="eval.json", windows=128):
    settings = {"dataset": "wikitext2", "seq_len": 512, "windows": windows, "reference": "/m/src"}
    path = tmp_path / name
    path.write_text(json.dumps({"settings": settings, "rows": [{"name": "reference", "size_bytes": 1}] + rows}))
    return path


def test_claims_interpolate_the_mixed_curve_in_log_kl(tmp_path):
    rows = [{"name": "mixed-0.05", "size_bytes": 700 * MIB, "kl": 0.04},
            {"name": "mixed-0.02", "size_bytes": 760 * MIB, "kl": 0.01},
            {"name": "awq", "size_bytes": 730 * MIB, "kl": 0.03},
            {"name": "int8", "size_bytes": 900 * MIB, "kl": 0.02}]
    _, mixed, uniform = size_vs_kl.read(_eval(tmp_path, rows))
    found = {c["question"]: c for c in size_vs_kl.claims(mixed, uniform)}
    at_awq = found["KL at the size of uniform awq"]
    assert math.isclose(at_awq["mixed"], math.sqrt(0.04 * 0.01))  # halfway in size: the geometric mean
    assert at_awq["holds"]  # 0.02 < 0.03
    at_int8 = found["MiB at the KL of uniform int8"]
    assert math.isclose(at_int8["mixed"], 700 + 60 * 0.5)  # log 0.02 is halfway between log 0.04 and log 0.01
    assert at_int8["holds"]


def test_a_result_both_larger_and_worse_than_another_is_off_the_curve(tmp_path):
    rows = [{"name": "mixed-0.05", "size_bytes": 700 * MIB, "kl": 0.04},
            {"name": "mixed-old", "size_bytes": 710 * MIB, "kl": 0.05},  # larger and worse than mixed-0.05
            {"name": "mixed-lmh-0.02", "size_bytes": 760 * MIB, "kl": 0.01},
            {"name": "mixed-old-2", "size_bytes": 800 * MIB, "kl": 0.012},  # larger and worse than mixed-lmh-0.02
            {"name": "awq", "size_bytes": 730 * MIB, "kl": 0.03},
            {"name": "int8", "size_bytes": 900 * MIB, "kl": 0.011}]
    _, mixed, uniform = size_vs_kl.read(_eval(tmp_path, rows))
    assert [r["name"] for r in size_vs_kl.frontier(mixed)] == ["mixed-0.05", "mixed-lmh-0.02"]
    found = {c["question"]: c for c in size_vs_kl.claims(mixed, uniform)}
    assert math.isclose(found["KL at the size of uniform awq"]["mixed"], math.sqrt(0.04 * 0.01))
    t = math.log(0.011 / 0.04) / math.log(0.01 / 0.04)  # int8's KL on the frontier, not between the old points
    assert math.isclose(found["MiB at the KL of uniform int8"]["mixed"], 700 + 60 * t)
    assert exit_status(size_vs_kl.main, [str(_eval(tmp_path, rows, "e2.json")), "--plot", str(tmp_path / "f.png")]) == 0


def test_outside_the_curve_is_not_claimed_and_the_command_draws(tmp_path):
    rows = [{"name": "mixed-a", "size_bytes": 800 * MIB, "kl": 0.01, "ppl": 10.0},
            {"name": "mixed-b", "size_bytes": 850 * MIB, "kl": 0.005, "ppl": 9.9},
            {"name": "awq", "size_bytes": 730 * MIB, "kl": 0.03, "ppl": 11.0}]
    path = _eval(tmp_path, rows)
    _, mixed, uniform = size_vs_kl.read(path)
    (claim,) = size_vs_kl.claims(mixed, uniform)
    assert claim["mixed"] is None and not claim["holds"]
    assert exit_status(size_vs_kl.main, [str(path), "--plot", str(tmp_path / "p.png"), "--json",
                                         str(tmp_path / "o.json")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert json.loads((tmp_path / "o.json").read_text())["claims"][0]["holds"] is False


def test_runs_of_the_same_text_pool_and_others_are_refused(tmp_path):
    first = _eval(tmp_path, [{"name": "awq", "size_bytes": 730 * MIB, "kl": 0.03}], "uniform.json")
    second = _eval(tmp_path, [{"name": "mixed-0.05", "size_bytes": 700 * MIB, "kl": 0.04},
                              {"name": "mixed-0.02", "size_bytes": 760 * MIB, "kl": 0.01}], "mixed.json")
    _, mixed, uniform = size_vs_kl.read(first, second)
    assert [r["name"] for r in mixed] == ["mixed-0.05", "mixed-0.02"] and [r["name"] for r in uniform] == ["awq"]
    other = _eval(tmp_path, [{"name": "mixed-x", "size_bytes": 1, "kl": 0.1}], "other.json", windows=32)
    assert exit_status(size_vs_kl.main, [str(first), str(other)]) != 0
    _, again, _ = size_vs_kl.read(second, second)  # one checkpoint scored twice alike: one point
    assert [r["name"] for r in again] == ["mixed-0.05", "mixed-0.02"]
    changed = _eval(tmp_path, [{"name": "mixed-0.05", "size_bytes": 700 * MIB, "kl": 0.041}], "changed.json")
    assert exit_status(size_vs_kl.main, [str(second), str(changed)]) != 0  # one name, other figures

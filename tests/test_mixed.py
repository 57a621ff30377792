"""Mixed precision to a quality budget (`qwen2q.mixed`, `qwen2q.calibrate.sensitivity`, `.allocate`).

Oracles: brute force for the knapsack; a float64 einsum for the predicted-KL formula; qwen2q's own eval
path (`qwen2q.evals.drift.compare`, the loaded checkpoint against the source) for the KL measured while
quantizing; real single-module quantizations of the embedded model for the sensitivity estimate and the
additivity assumption; the checkpoint loaders for the written files.
"""
from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch

import qwen2q
from qwen2q.calibrate.allocate import allocate, totals
from qwen2q.calibrate.pipeline import CalibrationSettings
from qwen2q.calibrate.sensitivity import predicted_kl
from qwen2q.errors import Qwen2qError
from qwen2q.evals.data import pydoc_topics
from qwen2q.files import DEFAULT_MODEL
from qwen2q.mixed import GROUPS, PROFILE_FILE, Profile, quantize_mixed
from qwen2q.quantization import quantize
from qwen2q.tokenizer import Tokenizer

SAMPLES, HELD, SEQ = 12, 4, 128


# -- the knapsack -----------------------------------------------------------------------------------

def _brute(sizes, kls, budget, by):
    best = None
    for pick in itertools.product(*(range(len(r)) for r in sizes)):
        size, kl = totals(sizes, kls, pick)
        weight, cost = (kl, size) if by == "kl" else (size, kl)
        if weight <= budget and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("by", ["kl", "size"])
@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_optimal_up_to_one_unit_per_group(seed, by):
    """Never better than the true optimum, never worse than the optimum of a budget one unit per group
    tighter (each option's amount is rounded up to whole units), always within the budget."""
    rng = random.Random(seed)
    groups, options = rng.randint(2, 6), rng.randint(2, 4)
    sizes = [sorted(rng.uniform(1, 100) for _ in range(options)) for _ in range(groups)]
    kls = [sorted((rng.uniform(0, 0.01) for _ in range(options)), reverse=True) for _ in range(groups)]
    weights = kls if by == "kl" else sizes
    budget = rng.uniform(sum(map(min, weights)), sum(map(max, weights)))  # feasible, and not trivially
    resolution = 2000
    pick = allocate(sizes, kls, budget, by=by, resolution=resolution)
    size, kl = totals(sizes, kls, pick)
    weight, cost = (kl, size) if by == "kl" else (size, kl)
    assert weight <= budget * (1 + 1e-12)
    optimum, tighter = _brute(sizes, kls, budget, by), _brute(sizes, kls, budget * (1 - groups / resolution), by)
    assert cost >= optimum - 1e-9
    if tighter is not None:
        assert cost <= tighter + 1e-9
    assert allocate(sizes, kls, budget, by=by, resolution=resolution) == pick  # deterministic


def test_allocation_floor_and_infeasible():
    sizes = [[1, 2, 4], [1, 2, 4]]
    kls = [[0.5, 0.2, 0.0], [0.4, 0.1, 0.0]]
    assert allocate(sizes, kls, 1.0) == [0, 0]
    assert allocate(sizes, kls, 1.0, floor=[1, 0]) == [1, 0]
    assert allocate(sizes, kls, 0.0) == [2, 2]
    with pytest.raises(Qwen2qError, match="fits in 1 bytes"):
        allocate(sizes, kls, 1.0, by="size")
    nan = float("nan")
    assert allocate([[1, nan, 4]], [[0.5, 0.0, 0.0]], 0.1) == [2]  # NaN: an option this group cannot take


def test_predicted_kl_formula_against_float64_einsum():
    torch.manual_seed(0)
    n, k, t = 24, 40, 300
    delta, x, fisher = torch.randn(n, k) * 1e-2, torch.randn(t, k), torch.rand(n)
    expected = 0.5 * torch.einsum("j,tj->", fisher.double(), (x.double() @ delta.double().t()) ** 2).item() / t
    assert predicted_kl(delta, x.t() @ x, t, fisher) == pytest.approx(expected, rel=1e-4)


def test_window_kls_of_many_models_against_float64_softmax():
    """Each model's per-window KL against one source (the source's log-probabilities shared) equals a
    float64 KL(source || model) over the first L - 1 positions, a model with its own lm_head included."""
    from qwen2q.calibrate.sensitivity import KL_CHUNK, many_window_kls, window_kls
    from qwen2q.model import RMSNorm

    torch.manual_seed(1)
    h, length, hidden, vocab = 2, KL_CHUNK + 37, 16, 50  # two logit chunks, the second partial
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = torch.rand(hidden) + 0.5
    head, own_head = torch.randn(vocab, hidden), torch.randn(vocab, hidden)
    source = torch.randn(h, length, hidden)
    others = {"near": (source + 0.1 * torch.randn_like(source), None), "far": (torch.randn_like(source), None),
              "own head": (source, own_head)}

    def oracle(hidden_states, w):
        def logp(x, weight):
            x = x.double()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
            return torch.log_softmax(x @ weight.double().t(), -1)
        lp, lq = logp(source[:, :-1], head), logp(hidden_states[:, :-1], head if w is None else w)
        return (lp.exp() * (lp - lq)).sum(-1).mean(-1).tolist()

    got = many_window_kls(norm, head, source, others)
    for key, (states, w) in others.items():
        assert got[key] == pytest.approx(oracle(states, w), rel=1e-4, abs=1e-7)
        assert got[key] == pytest.approx(window_kls(norm, head, source, states, w), rel=1e-6, abs=1e-9)
    assert got["near"][0] < got["far"][0]


# -- on the embedded model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ids():
    tokens = Tokenizer(DEFAULT_MODEL).encode(pydoc_topics().text)
    return torch.tensor(tokens[: (SAMPLES + HELD) * SEQ]).view(SAMPLES + HELD, SEQ)


def settings(ids, compute_dtype="float32"):
    """fp32 forwards: in bf16, two runs whose inputs differ at all differ by bf16's rounding noise too, a KL
    floor of ~1e-5 on this model, as large as what quantizing one module here adds."""
    return CalibrationSettings(ids=ids, search_tokens=4 * SEQ, holdout=HELD, compute_dtype=compute_dtype)


@pytest.fixture(scope="module")
def first(ids, tmp_path_factory):
    """One mixed run: its report, where it wrote and its profile."""
    dst = tmp_path_factory.mktemp("mixed") / "kl"
    report = quantize_mixed(DEFAULT_MODEL, dst, kl_budget=2e-4, calibration=settings(ids), progress=False,
                            log=lambda line: None)
    return report, dst


def groups_kl(ids, tmp_path, groups: list[str], group_size: int) -> float:
    """The measured held-out KL when only `groups` (e.g. "model.layers.1.mlp.down") are quantized, to int4
    in groups of `group_size` by GPTQ alone: the rounding the estimate models (AWQ's scale search, which
    the options add, also rounds the norms and linears it folds its scales into)."""
    from qwen2q.recipe import Recipe, Rule

    rules = tuple(Rule(f"{g.rsplit('.', 2)[0]}.{m}", "ct-pack", {"bits": 4, "group_size": group_size,
                                                                 "symmetric": False}, "gptq")
                  for g in groups for m in GROUPS[".".join(g.rsplit(".", 2)[1:])])
    dst = tmp_path / "-".join(groups)
    return quantize(DEFAULT_MODEL, dst, Recipe(rules, skip=("lm_head",)), settings(ids), progress=False).holdout_kl


def test_kl_measured_while_quantizing_equals_the_eval_of_the_written_checkpoint(ids, tmp_path):
    """holdout_kl (two layer-by-layer streams inside the quantize pass) against `drift.compare` on the
    loaded checkpoint and the source, fp32 throughout: the same number by an independent path."""
    from qwen2q.evals.drift import compare
    from qwen2q.qconfig import QuantConfig

    recipe, _ = QuantConfig("awq", layout="compressed-tensors").recipe(), None
    report = quantize(DEFAULT_MODEL, tmp_path / "q", recipe, settings(ids, compute_dtype="float32"), progress=False)
    ref = qwen2q.load(DEFAULT_MODEL, dtype="float32").model
    cand = qwen2q.load(tmp_path / "q", dtype="float32").model
    cand.eval()
    with torch.no_grad():
        measured = compare(ref, cand, ids[SAMPLES:].reshape(-1), SEQ)["kl"]
    assert report.holdout_kl == pytest.approx(measured, rel=0.02)
    assert report.holdout_kl > 0


def test_profile_predicts_each_groups_kl_within_a_factor_of_three(first, ids, tmp_path):
    """The second-order estimate against the real KL of quantizing one group alone (int4 g128: AWQ +
    GPTQ, which the estimate leaves AWQ's scale search out of), for a group of each kind."""
    report, dst = first
    profile = json.loads((dst / PROFILE_FILE).read_text())["profile"]
    rows = []
    for group in ("model.layers.0.attn.qkv", "model.layers.1.attn.o", "model.layers.2.mlp.gate_up",
                  "model.layers.3.mlp.down"):
        prefix, kind = group.rsplit(".", 2)[0], ".".join(group.rsplit(".", 2)[1:])
        predicted = sum(profile["predicted_kl"][f"{prefix}.{m}"]["int4-g128"] for m in GROUPS[kind])
        rows.append((group, predicted, groups_kl(ids, tmp_path, [group], 128)))
    for group, predicted, measured in rows:
        assert measured / 3 < predicted < measured * 3, rows


@pytest.mark.parametrize("kind", ["attn.qkv", "mlp.down"])
def test_uniform_trial_of_a_kind_is_the_kl_of_that_kind_quantized_everywhere(first, ids, tmp_path, kind):
    """The profile's uniform trial of one kind (its linears in every layer int4 g128 by GPTQ, on the
    held-out windows) against the held-out KL of a checkpoint quantized so by the quantize pipeline.
    Not the same number: the trial's GPTQ statistics come from unquantized inputs, the pipeline's from the
    quantized layers before (0.5% and 1.6% apart here)."""
    _, dst = first
    profile = json.loads((dst / PROFILE_FILE).read_text())["profile"]
    trial = profile["uniform_measured_kl_by_kind"][kind]["int4-g128"]
    measured = groups_kl(ids, tmp_path, [f"model.layers.{i}.{kind}" for i in range(4)], 128)
    assert trial == pytest.approx(measured, rel=0.05), (trial, measured)
    assert set(profile["uniform_measured_kl_by_kind"]) == set(GROUPS)


def test_each_kinds_predictions_are_scaled_by_its_own_trial(first):
    """group_table's KL of a group is its members' predictions times measured / predicted of its kind's
    uniform trial; a profile of an earlier version (one trial of every linear) scales every kind alike."""
    _, dst = first
    data = json.loads((dst / PROFILE_FILE).read_text())["profile"]
    p = Profile.read(dst, data["model"], ("int4-g128", "int8", "bf16"), "compressed-tensors")
    names, _, kls = p.group_table(4)
    row = names.index("model.layers.2.mlp.gate_up")
    members = [f"model.layers.2.{m}" for m in GROUPS["mlp.gate_up"]]
    kind_predicted = sum(v["int8"] for n, v in data["predicted_kl"].items() if n.endswith(("gate_proj", "up_proj")))
    factor = data["uniform_measured_kl_by_kind"]["mlp.gate_up"]["int8"] / kind_predicted
    assert kls[row][1] == pytest.approx(factor * sum(data["predicted_kl"][n]["int8"] for n in members), rel=1e-12)
    assert p.correction("int8", "mlp.gate_up") != p.correction("int8", "attn.qkv")
    old = {"all": {"int8": sum(r["int8"] for r in data["uniform_measured_kl_by_kind"].values())}}
    legacy = Profile(p.model, p.calibration, p.choices, p.layout, p.kl, p.size, p.seconds, old)
    assert legacy.correction("int8", "mlp.gate_up") == legacy.correction("int8", "attn.qkv") == pytest.approx(
        old["all"]["int8"] / sum(v["int8"] for v in data["predicted_kl"].values()))


def test_additivity_of_group_kls(ids, tmp_path):
    """The assumption the allocation rests on: the KL of several quantized groups is about the sum of
    each one's alone (here within 35%)."""
    groups = ["model.layers.0.mlp.down", "model.layers.1.attn.qkv", "model.layers.2.mlp.gate_up",
              "model.layers.3.attn.o"]
    alone = [groups_kl(ids, tmp_path, [g], 32) for g in groups]
    together = groups_kl(ids, tmp_path, groups, 32)
    assert together == pytest.approx(sum(alone), rel=0.35), (alone, together)


def test_kl_budget_result_meets_the_budget_loads_and_is_deterministic(first, ids, tmp_path):
    report, dst = first
    assert report.measured_kl <= 2e-4
    assert len(set(report.assignment.values())) > 1  # mixed: the budget is between the choices' extremes
    config = json.loads((dst / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and len(q["config_groups"]) >= 1
    assert config["qwen2q"]["method"] == "mixed" and config["qwen2q"]["holdout_kl"] == report.measured_kl
    m = qwen2q.load(dst, dtype="float32")
    kept = [n for n, o in report.assignment.items() if o == "bf16"]
    for group, option in report.assignment.items():
        prefix, kind = group.rsplit(".", 2)[0], ".".join(group.rsplit(".", 2)[1:])
        module = m.model.get_submodule(f"{prefix}.{GROUPS[kind][0]}")
        assert (type(module).__name__ == "Linear") == (option == "bf16"), (group, option, type(module))
    again = quantize_mixed(DEFAULT_MODEL, tmp_path / "again", kl_budget=2e-4, calibration=settings(ids),
                           profile=dst, progress=False, log=lambda line: None)
    assert again.assignment == report.assignment and again.profile_seconds == 0
    looser = quantize_mixed(DEFAULT_MODEL, tmp_path / "looser", kl_budget=1e-3, calibration=settings(ids),
                            profile=dst, progress=False, log=lambda line: None)
    assert looser.bits_per_weight < report.bits_per_weight and looser.measured_kl <= 1e-3
    assert kept or report.bits_per_weight < 16


def test_target_bits(first, ids, tmp_path):
    _, dst = first
    r = quantize_mixed(DEFAULT_MODEL, tmp_path / "bits", target_bits=5.0, calibration=settings(ids), profile=dst,
                       progress=False, log=lambda line: None)
    assert 4.15 < r.bits_per_weight <= 5.0
    assert r.report.holdout_kl == r.measured_kl > 0


def test_a_profile_lacking_a_choice_measures_that_choice_and_adds_it(first, ids, tmp_path):
    """--profile without int4-ch, run with int4-ch among the choices: int4-ch is measured on the same
    calibration (its predictions and uniform trials equal those of a profile of int4-ch alone) and added,
    the profile's own options kept as they were.  Below the size of int4 g128 everywhere, the allocation
    takes int4-ch for some groups, and the written linears hold the bytes the profile counts for them."""
    from safetensors import safe_open

    from qwen2q.devices import parse_device
    from qwen2q.info import module_table
    from qwen2q.mixed import measure_profile
    from qwen2q.quantization import read_source

    _, dst = first
    old = json.loads((dst / PROFILE_FILE).read_text())["profile"]
    src, config, files = read_source(DEFAULT_MODEL)
    alone = measure_profile(src, config, files, ("int4-ch",), "compressed-tensors", settings(ids), parse_device("cpu"),
                            progress=False)
    g128 = sum(row["int4-g128"] for row in old["bytes"].values())
    weights = sum(4 * row["bf16"] for row in old["bytes"].values()) / 8  # bf16: 2 bytes, 16 bits a weight
    target = 8 * (g128 + sum(alone.size[n]["int4-ch"] for n in alone.size)) / 2 / weights  # between all-ch and all-g128
    lines: list[str] = []
    r = quantize_mixed(DEFAULT_MODEL, tmp_path / "ch", target_bits=target, choices="int4-ch,int4-g128,int4-g32,bf16",
                       calibration=settings(ids), profile=dst, progress=False, log=lines.append)
    assert any(line.startswith("profile: int4-ch measured in") for line in lines), lines
    new = json.loads((tmp_path / "ch" / PROFILE_FILE).read_text())["profile"]
    assert new["choices"] == ["int4-ch", "int4-g128", "int4-g32", "bf16"] and 0 < r.profile_seconds
    for name, row in new["predicted_kl"].items():
        assert {c: row[c] for c in ("int4-g128", "int4-g32", "bf16")} == \
            {c: old["predicted_kl"][name][c] for c in ("int4-g128", "int4-g32", "bf16")}
        assert row["int4-ch"] == pytest.approx(alone.kl[name]["int4-ch"], rel=1e-6)
        assert new["bytes"][name]["int4-ch"] == alone.size[name]["int4-ch"]
    for kind in GROUPS:
        assert new["uniform_measured_kl_by_kind"][kind]["int4-g128"] == old["uniform_measured_kl_by_kind"][kind]["int4-g128"]
        assert new["uniform_measured_kl_by_kind"][kind]["int4-ch"] == pytest.approx(alone.uniform[kind]["int4-ch"], rel=1e-6)
    assert r.bits_per_weight <= target and "int4-ch" in r.assignment.values()
    assert len(set(r.assignment.values())) > 1, r.assignment
    stored = {}
    for f in (tmp_path / "ch").glob("*.safetensors"):
        with safe_open(f, "pt") as t:
            for key in t.keys():
                if not key.endswith(".bias"):
                    stored[key.rsplit(".", 1)[0]] = stored.get(key.rsplit(".", 1)[0], 0) + t.get_tensor(key).nbytes
    grouped = [g for g, o in r.assignment.items() if o == "int4-ch"]
    for group in grouped:
        prefix, kind = group.rsplit(".", 2)[0], ".".join(group.rsplit(".", 2)[1:])
        for member in GROUPS[kind]:
            name = f"{prefix}.{member}"
            assert stored[name] == new["bytes"][name]["int4-ch"], name
            n, k = stored_shape(tmp_path / "ch", name)  # 4-bit codes, an fp16 scale and a 4-bit zero a row
            assert stored[name] == n * k // 2 + 2 * n + n // 2 + 16, name
    rows = [line.split() for line in module_table(tmp_path / "ch").splitlines()[1:]]
    assert sum(row.count("int4-ch") for row in rows) > 0, rows  # info names the choice as --choices does
    loaded = qwen2q.load(tmp_path / "ch", dtype="float32").model
    with torch.no_grad():
        assert torch.isfinite(loaded(ids[:1])).all()


def stored_shape(dst, name: str) -> tuple[int, int]:
    """[N, K] of linear `name` as its compressed-tensors weight_shape records it."""
    from safetensors import safe_open

    for f in dst.glob("*.safetensors"):
        with safe_open(f, "pt") as t:
            if f"{name}.weight_shape" in t.keys():
                n, k = t.get_tensor(f"{name}.weight_shape").tolist()
                return n, k
    raise KeyError(name)


def optimistic_profile(dst, tmp_path):
    """A copy of `dst`'s profile predicting 20x too little KL (uniform trials included): tmp_path/optimistic.json."""
    data = json.loads((dst / PROFILE_FILE).read_text())
    for row in [*data["profile"]["predicted_kl"].values(), *data["profile"]["uniform_measured_kl_by_kind"].values()]:
        for option in row:
            row[option] /= 20
    fake = tmp_path / "optimistic.json"
    fake.write_text(json.dumps(data))
    return fake


def test_over_budget_moves_groups_up_and_leaves_nothing_behind(first, ids, tmp_path):
    """A profile that predicts 20x too little (uniform trials included): the first trial measures over the
    budget, and the next attempt, with the predictions scaled by measured / predicted, meets it after one
    final pass; nothing but the result is written."""
    _, dst = first
    fake = optimistic_profile(dst, tmp_path)
    lines = []
    r = quantize_mixed(DEFAULT_MODEL, tmp_path / "out", kl_budget=2e-4, calibration=settings(ids), profile=fake,
                       progress=False, log=lines.append)
    assert len(r.attempts) >= 2 and r.attempts[0].measured_kl > 2e-4 >= r.measured_kl, lines
    assert r.attempts[0].kind == "trial" and r.attempts[-1].kind == "final"  # the trial caught it: one AWQ pass
    assert [a.kind for a in r.attempts].count("final") == 1, lines
    assert r.attempts[-1].bits_per_weight > r.attempts[0].bits_per_weight
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimistic.json", "out"]


def test_final_pass_over_budget_is_discarded_and_made_again(first, ids, tmp_path, monkeypatch):
    """With every trial let through, the same optimistic profile fails in the final (AWQ) pass instead:
    the result is discarded unwritten (OverBudget before install) and the next attempt meets the budget."""
    import qwen2q.mixed as mixed

    _, dst = first
    fake = optimistic_profile(dst, tmp_path)
    monkeypatch.setattr(mixed, "TRIAL_AIM", 1e9)
    r = quantize_mixed(DEFAULT_MODEL, tmp_path / "out", kl_budget=2e-4, calibration=settings(ids), profile=fake,
                       progress=False, log=lambda line: None)
    finals = [a for a in r.attempts if a.kind == "final"]
    assert len(finals) >= 2 and finals[0].measured_kl > 2e-4 >= r.measured_kl == finals[-1].measured_kl
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimistic.json", "out"]


def test_trial_kl_is_the_kl_of_the_checkpoint_it_stands_for(first, ids, tmp_path):
    """trial_kl (GPTQ alone, nothing written) against `drift.compare` of the checkpoint the trial recipe
    writes (fp32 throughout; the embedded model's 12 samples are fewer than TRIAL_SAMPLES, so both use
    all of them): the same number, and the trial wrote nothing."""
    from qwen2q.checkpoint import weight_files
    from qwen2q.config import Qwen2Config
    from qwen2q.evals.drift import compare
    from qwen2q.mixed import recipe_for, trial_kl, trial_recipe

    report, _ = first
    recipe = recipe_for(report.assignment, "compressed-tensors")
    plan = trial_recipe(recipe)
    assert {r.algorithm for r in plan.rules} <= {"gptq", "rtn"} and len(plan.rules) == len(recipe.rules)
    config = Qwen2Config.from_file(DEFAULT_MODEL / "config.json")
    before = sorted(tmp_path.iterdir())
    kl, bound = trial_kl(DEFAULT_MODEL, config, weight_files(DEFAULT_MODEL), recipe, settings(ids),
                         torch.device("cpu"), progress=False)
    assert bound > kl
    assert sorted(tmp_path.iterdir()) == before
    quantize(DEFAULT_MODEL, tmp_path / "trial", plan, settings(ids), progress=False)
    ref = qwen2q.load(DEFAULT_MODEL, dtype="float32").model
    cand = qwen2q.load(tmp_path / "trial", dtype="float32").model
    with torch.no_grad():
        measured = compare(ref, cand.eval(), ids[SAMPLES:].reshape(-1), SEQ)["kl"]
    assert kl == pytest.approx(measured, rel=0.02) and kl > 0


def test_upper_bound_is_the_mean_plus_z_standard_errors():
    """Against the standard library's statistics: mean + z(0.95) * stdev / sqrt(n); one window: itself."""
    import statistics

    from qwen2q.calibrate.sensitivity import upper_bound

    rng = random.Random(0)
    values = [rng.lognormvariate(-4, 0.5) for _ in range(16)]
    expected = statistics.mean(values) + statistics.NormalDist().inv_cdf(0.95) * statistics.stdev(values) / 4
    assert upper_bound(values) == pytest.approx(expected, rel=1e-3)
    assert upper_bound([0.02]) == 0.02 and upper_bound([0.01, 0.01]) == pytest.approx(0.01)


def test_kl_data_gives_the_held_out_windows(tmp_path):
    """With holdout_source, the held-out rows are the first windows of that text (the tokenizer's own
    encoding of it), the samples still the calibration text's."""
    from qwen2q.calibrate.pipeline import calibration_ids

    text = re.sub(r"\n\s*\n", "\n", pydoc_topics().text)  # one document per file: no blank lines
    (tmp_path / "calib.txt").write_text(text[: len(text) // 2])
    (tmp_path / "target.txt").write_text(text[len(text) // 2 :])
    got, described = calibration_ids(DEFAULT_MODEL, CalibrationSettings(
        source=str(tmp_path / "calib.txt"), samples=3, seq_len=SEQ, holdout=2, holdout_source=str(tmp_path / "target.txt")))
    tok = Tokenizer(DEFAULT_MODEL)
    target = tok.encode(text[len(text) // 2 :] + "\n\n")
    calib = tok.encode(text[: len(text) // 2] + "\n\n")
    assert got.shape == (5, SEQ) and "held-out windows" in described and "target.txt" in described
    assert got[3:].reshape(-1).tolist() == target[: 2 * SEQ]
    assert got[:3].reshape(-1).tolist() == calib[: 3 * SEQ]


def test_native_layout_with_nf4(first, ids, tmp_path):
    """--format native may use nf4: the checkpoint is qwen2q's mixed layout and loads in qwen2q."""
    r = quantize_mixed(DEFAULT_MODEL, tmp_path / "native", target_bits=4.6, choices="nf4,int4-g128,int8,bf16",
                       layout="native", calibration=settings(ids), progress=False, log=lambda line: None)
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    formats = set(r.assignment.values())
    assert config["quantization_config"]["quant_method"] == ("qwen2q-mixed" if len(formats - {"bf16"}) > 1
                                                             else config["quantization_config"]["quant_method"])
    qwen2q.load(tmp_path / "native", dtype="float32")


def test_errors_are_one_line(ids, tmp_path, first):
    _, dst = first
    with pytest.raises(Qwen2qError, match="nf4 has no compressed-tensors form"):
        quantize_mixed(DEFAULT_MODEL, tmp_path / "x", kl_budget=0.01, choices="nf4,bf16", calibration=settings(ids))
    with pytest.raises(Qwen2qError, match="unknown choice 'int3'"):
        quantize_mixed(DEFAULT_MODEL, tmp_path / "x", kl_budget=0.01, choices="int3,bf16", calibration=settings(ids))
    with pytest.raises(Qwen2qError, match="one of --kl-budget and --target-bits"):
        quantize_mixed(DEFAULT_MODEL, tmp_path / "x", kl_budget=0.01, target_bits=4.5)
    with pytest.raises(Qwen2qError, match="below the smallest"):
        quantize_mixed(DEFAULT_MODEL, tmp_path / "x", target_bits=3.0, calibration=settings(ids), profile=dst)
    with pytest.raises(Qwen2qError, match="holds int4-g128,int4-g32,int8,bf16 in compressed-tensors"):
        quantize_mixed(DEFAULT_MODEL, tmp_path / "x", kl_budget=0.01, choices="int4-g128,bf16", layout="native",
                       calibration=settings(ids), profile=dst)
    with pytest.raises(Qwen2qError, match="int4-ch has no native form"):
        quantize_mixed(DEFAULT_MODEL, tmp_path / "x", kl_budget=0.01, choices="int4-ch,bf16", layout="native",
                       calibration=settings(ids))
    with pytest.raises(Qwen2qError, match="lacks int4-g64 and was measured on other calibration text"):
        quantize_mixed(DEFAULT_MODEL, tmp_path / "x", kl_budget=0.01, choices="int4-g64,bf16",
                       calibration=settings(ids[1:]), profile=dst)
    other = json.loads((dst / PROFILE_FILE).read_text())
    other["profile"]["model"]["layers"] = 99
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(Qwen2qError, match="measured on another model"):
        quantize_mixed(DEFAULT_MODEL, tmp_path / "x", kl_budget=0.01, calibration=settings(ids),
                       profile=tmp_path / "other.json")
    assert not (tmp_path / "x").exists()


def test_profile_round_trips(first):
    _, dst = first
    key = json.loads((dst / PROFILE_FILE).read_text())["profile"]["model"]
    p = Profile.read(dst, key, ("int4-g128", "bf16"), "compressed-tensors")
    assert p.choices == ("int4-g128", "bf16") and len(p.kl) == 4 * 7


def test_info_shows_the_format_of_each_linear(first):
    from qwen2q.info import module_table

    report, dst = first
    table = module_table(dst)
    assert table is not None and table.splitlines()[0].split() == ["layers", "q", "k", "v", "o", "gate", "up", "down"]
    shown = {}
    for line in table.splitlines()[1:]:
        cells = line.split()
        first_layer, last_layer = (int(x) for x in (cells[0].split("-") * 2)[:2])
        for i in range(first_layer, last_layer + 1):
            shown[f"model.layers.{i}.attn.qkv"], shown[f"model.layers.{i}.attn.o"] = cells[1], cells[4]
            shown[f"model.layers.{i}.mlp.gate_up"], shown[f"model.layers.{i}.mlp.down"] = cells[5], cells[7]
    assert shown == report.assignment


# -- the command ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--kl-budget", "0.01", "--target-bits", "4.5"], "not both"),
    (["--choices", "int8,bf16", "-m", "int8"], "--choices goes with --kl-budget or --target-bits"),
    (["--kl-budget", "0.01", "-m", "awq"], "--method does not go with --kl-budget"),
    (["--kl-budget", "0.01", "--choices", "nf4,bf16"], "nf4 has no compressed-tensors form"),
    (["--kl-budget", "0.01", "--choices", "int3"], "unknown choice 'int3'"),
    (["--kl-budget", "0.01", "--rounding", "nearest"], "--rounding does not go with"),
    (["--target-bits", "4.5", "--profile", "/nonexistent/qwen2q_mixed.json"], "not a qwen2q mixed-precision profile"),
    (["-m", "int8", "--kl-data", "x.txt"], "--kl-data goes with --kl-budget or --target-bits"),
    (["-m", "int8", "--keep-lm-head"], "--keep-lm-head goes with --kl-budget or --target-bits"),
    (["--kl-budget", "0.01", "--kl-data", "/nonexistent/text.txt"], "/nonexistent/text.txt"),
])
def test_cli_refuses_bad_mixed_options_in_one_line(tmp_path, args, needle):
    from cli_support import one_line_error, run_cli

    one_line_error(run_cli("quantize", "qwen2q:tiny", tmp_path / "out", *args), needle)
    assert not (tmp_path / "out").exists()


def test_cli_kl_budget_end_to_end(tmp_path):
    """`qwen2q quantize --kl-budget`: the report names the budget, the choices and the measured KL;
    `qwen2q info` shows the format of each linear."""
    from cli_support import run_cli

    text = tmp_path / "calib.txt"
    text.write_text(pydoc_topics().text)
    target = tmp_path / "target.txt"
    target.write_text(pydoc_topics().text[::-1])  # another text: the budget holds on it, not on the calibration text
    r = run_cli("quantize", "qwen2q:tiny", tmp_path / "out", "--kl-budget", "0.001", "--calib-data", text,
                "--calib-samples", "8", "--calib-seq-len", "64", "--search-tokens", "128", "--kl-data", target)
    assert r.returncode == 0, r.stderr
    assert "profile:" in r.stderr and "trial (GPTQ alone" in r.stderr and "measured KL" in r.stderr
    assert "target.txt" in json.loads((tmp_path / "out" / "config.json").read_text())["qwen2q"]["calibration"]
    assert any(line.split() == ["budget", "KL", "<=", "0.001"] for line in r.stdout.splitlines())
    kl_line = next(line for line in r.stdout.splitlines() if line.strip().startswith("KL "))
    assert float(kl_line.split()[1]) < float(kl_line.split("upper bound")[1].split()[0]) <= 0.001
    info = run_cli("info", tmp_path / "out")
    assert info.returncode == 0 and "compressed-tensors" in info.stdout


def test_module_formats_reads_each_config_kind():
    """`qwen2q info`'s per-linear labels from the configs qwen2q writes (and the peers' single-format ones)."""
    from qwen2q.info import module_formats

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    ct = {"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:^(.*\\.)?model\\.layers\\.1\\.mlp\\.down_proj(\\..*)?$"],
          "config_groups": {"group_0": {"targets": ["model.layers.0.mlp.down_proj"],
                                        "weights": {"num_bits": 8, "strategy": "channel"}},
                            "group_1": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group",
                                                                           "group_size": 32}}}}
    assert module_formats(ct, names, "bf16") == dict(zip(names, ["int4-g32", "int8", "bf16"]))
    mixed = {"quant_method": "qwen2q-mixed", "modules_to_not_convert": ["lm_head"], "groups": [
        {"format": "bnb-nf4", "config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                         "bnb_4bit_quant_type": "nf4"}, "modules": [names[0]]},
        {"format": "awq-gemm", "config": {"quant_method": "awq", "bits": 4, "group_size": 128}, "modules": [names[2]]}]}
    assert module_formats(mixed, names, "bf16") == dict(zip(names, ["nf4", "bf16", "int4-g128"]))
    awq = {"quant_method": "awq", "bits": 4, "group_size": 64, "modules_to_not_convert": ["down_proj"]}
    assert module_formats(awq, names, "fp16") == dict(zip(names, ["int4-g64", "fp16", "fp16"]))

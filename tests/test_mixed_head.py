"""lm_head as one more mixed-precision group (`qwen2q.mixed`), quantized after the last layer
(`LayerCalibrator.head`), on an untied tiny checkpoint (a tied lm_head is the embedding table and is
never quantized).

Oracles: qwen2q's eval path (`qwen2q.evals.drift.compare`, the loaded checkpoint against the source) for
the KL measured while quantizing; the profile's lm_head KL (`sensitivity.quantized_heads`, its own GPTQ of the
final norm's gram) against the KL the quantize pass measures for a checkpoint whose only quantized
module is lm_head (`LayerCalibrator.head`, another path); the stored tensors for the bytes the profile
counts; round to nearest for what GPTQ's rounding gains.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_checkpoint

import qwen2q
from qwen2q.calibrate.pipeline import CalibrationSettings
from qwen2q.evals.data import pydoc_topics
from qwen2q.files import DEFAULT_MODEL
from qwen2q.mixed import PROFILE_FILE, quantize_mixed
from qwen2q.qlinear import QuantLinear
from qwen2q.quantization import quantize
from qwen2q.recipe import Recipe, Rule
from qwen2q.tokenizer import Tokenizer

SAMPLES, HELD, SEQ = 12, 4, 128
INT4_G32 = {"bits": 4, "group_size": 32, "symmetric": False}
INT8 = {"bits": 8, "group_size": 0, "symmetric": True}


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("untied") / "src"
    make_hf_checkpoint(path, seed=3, tie_word_embeddings=False)
    return path


@pytest.fixture(scope="module")
def ids(untied):
    tokens = Tokenizer(untied).encode(pydoc_topics().text)
    return torch.tensor(tokens[: (SAMPLES + HELD) * SEQ]).view(SAMPLES + HELD, SEQ)


def settings(ids):
    return CalibrationSettings(ids=ids, search_tokens=4 * SEQ, holdout=HELD, compute_dtype="float32")


def test_a_quantized_lm_head_is_written_loaded_and_measured_as_the_eval_measures_it(untied, ids, tmp_path):
    """A recipe naming lm_head: a compressed-tensors config group targets it (it is not in "ignore"),
    qwen2q loads it as a quantized module, the KL measured while quantizing is the KL the eval measures
    of the loaded checkpoint, and GPTQ's rounding of lm_head measures less KL than round to nearest."""
    from qwen2q.evals.drift import compare

    def made(head_algorithm):
        recipe = Recipe((Rule("lm_head", "ct-pack", INT4_G32, head_algorithm), Rule("*", "ct-pack", INT8, "gptq")),
                        skip=())
        return quantize(untied, tmp_path / head_algorithm, recipe, settings(ids), progress=False)

    gptq, rtn = made("gptq"), made("rtn")
    q = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert any(g["targets"] == ["lm_head"] for g in q["config_groups"].values()) and "lm_head" not in q["ignore"]
    ref = qwen2q.load(untied, dtype="float32").model
    cand = qwen2q.load(tmp_path / "gptq", dtype="float32").model
    assert isinstance(cand.lm_head, QuantLinear)
    with torch.no_grad():
        measured = compare(ref, cand, ids[SAMPLES:].reshape(-1), SEQ)["kl"]
    assert gptq.holdout_kl == pytest.approx(measured, rel=0.02)
    assert 0 < gptq.holdout_kl < rtn.holdout_kl
    kept = quantize(untied, tmp_path / "kept", Recipe((Rule("*", "ct-pack", INT8, "gptq"),)), settings(ids),
                    progress=False)
    assert kept.holdout_kl < gptq.holdout_kl  # the quantized lm_head is what the KL holds, not just the layers
    assert not isinstance(qwen2q.load(tmp_path / "kept", dtype="float32").model.lm_head, QuantLinear)


@pytest.fixture(scope="module")
def mixed(untied, ids, tmp_path_factory):
    """A --target-bits run on the untied model, lm_head in the search: (report, its output, the log)."""
    dst = tmp_path_factory.mktemp("mixed") / "head"
    lines: list[str] = []
    report = quantize_mixed(untied, dst, target_bits=6.0, choices="int4-g32,int8,bf16", calibration=settings(ids),
                            progress=False, log=lines.append)
    return report, dst, lines


def test_lm_head_joins_the_search_and_its_profile_is_the_kl_of_lm_head_alone(mixed, untied, ids, tmp_path):
    report, dst, _ = mixed
    profile = json.loads((dst / PROFILE_FILE).read_text())["profile"]
    assert "lm_head" in report.assignment and set(profile["predicted_kl"]["lm_head"]) == {"int4-g32", "int8", "bf16"}
    assert profile["predicted_kl"]["lm_head"]["bf16"] == 0
    for option, params in (("int8", INT8), ("int4-g32", INT4_G32)):
        alone = quantize(untied, tmp_path / option, Recipe((Rule("lm_head", "ct-pack", params, "gptq"),), skip=()),
                         settings(ids), progress=False)
        assert profile["predicted_kl"]["lm_head"][option] == pytest.approx(alone.holdout_kl, rel=1e-3), option
        assert profile["uniform_measured_kl_by_kind"]["lm_head"][option] == profile["predicted_kl"]["lm_head"][option]
    assert 0 < profile["predicted_kl"]["lm_head"]["int8"] < profile["predicted_kl"]["lm_head"]["int4-g32"]


def test_bits_count_the_stored_bytes_of_every_linear_lm_head_included(mixed):
    from safetensors import safe_open

    report, dst, _ = mixed
    profile = json.loads((dst / PROFILE_FILE).read_text())["profile"]
    stored = {}
    for f in dst.glob("*.safetensors"):
        with safe_open(f, "pt") as t:
            for key in t.keys():
                module, _, suffix = key.rpartition(".")
                if module in profile["bytes"] and suffix != "bias":
                    stored[module] = stored.get(module, 0) + t.get_tensor(key).nbytes
    head = report.assignment["lm_head"]
    assert stored["lm_head"] == profile["bytes"]["lm_head"][head]
    weights = sum(row["bf16"] for row in profile["bytes"].values()) / 4  # fp32 source: 4 bytes a weight
    assert 8 * sum(stored.values()) / weights == pytest.approx(report.bits_per_weight, rel=1e-9)
    loaded = qwen2q.load(dst, dtype="float32").model
    assert isinstance(loaded.lm_head, QuantLinear) == (head != "bf16")
    card = (dst / "README.md").read_text()
    assert ("lm_head is quantized too" in card) == (head != "bf16") and ("lm_head keep" in card) == (head == "bf16")


def test_info_names_lm_heads_format(mixed):
    from qwen2q.info import module_table

    report, dst, _ = mixed
    assert module_table(dst).splitlines()[-1] == f"lm_head: {report.assignment['lm_head']}"


def test_keep_lm_head_and_a_profile_without_it(mixed, untied, ids, tmp_path):
    """keep_head: lm_head stays out of the search and the profile; that profile, reused with lm_head in the
    search, has lm_head measured on its own calibration and added (the same numbers as a whole profile's)."""
    _, dst, _ = mixed
    kept = quantize_mixed(untied, tmp_path / "kept", target_bits=6.0, choices="int4-g32,int8,bf16",
                          calibration=settings(ids), profile=dst, keep_head=True, progress=False, log=lambda line: None)
    assert "lm_head" not in kept.assignment
    assert not isinstance(qwen2q.load(tmp_path / "kept", dtype="float32").model.lm_head, QuantLinear)
    data = json.loads((dst / PROFILE_FILE).read_text())
    for key in ("predicted_kl", "bytes", "uniform_measured_kl_by_kind"):
        data["profile"][key].pop("lm_head")
    without = tmp_path / "without.json"
    without.write_text(json.dumps(data))
    lines: list[str] = []
    again = quantize_mixed(untied, tmp_path / "again", target_bits=6.0, choices="int4-g32,int8,bf16",
                           calibration=settings(ids), profile=without, progress=False, log=lines.append)
    assert any(line.startswith("profile: lm_head as int4-g32,int8,bf16 measured in") for line in lines), lines
    whole = json.loads((dst / PROFILE_FILE).read_text())["profile"]["predicted_kl"]["lm_head"]
    added = json.loads((tmp_path / "again" / PROFILE_FILE).read_text())["profile"]["predicted_kl"]["lm_head"]
    assert added == pytest.approx(whole, rel=1e-6) and "lm_head" in again.assignment


def test_a_tied_lm_head_never_joins_the_search(tmp_path):
    """The embedded model ties lm_head to its embedding table: no lm_head group, nothing measured for it."""
    tokens = Tokenizer(DEFAULT_MODEL).encode(pydoc_topics().text)
    ids = torch.tensor(tokens[: 10 * 64]).view(10, 64)
    s = CalibrationSettings(ids=ids, search_tokens=128, holdout=2, compute_dtype="float32")
    r = quantize_mixed(DEFAULT_MODEL, tmp_path / "tied", target_bits=5.0, choices="int4-g32,int8", calibration=s,
                       progress=False, log=lambda line: None)
    assert "lm_head" not in r.assignment
    assert "lm_head" not in json.loads((tmp_path / "tied" / PROFILE_FILE).read_text())["profile"]["predicted_kl"]

"""Recipes: ordered rules giving each linear a format and an algorithm, several formats in one checkpoint.

The oracle for a mixed checkpoint is the single-format checkpoints of the same source (themselves checked
against bitsandbytes and AutoAWQ elsewhere): every module of the mixed file stores exactly the bytes the
one-format conversion stores for it, and the loaded model computes what a float model holding those
dequantized weights computes."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_checkpoint
from qwen2q.architecture import LINEARS
from qwen2q.calibrate.pipeline import CalibrationSettings
from qwen2q.errors import Qwen2qError
from qwen2q.loader import load_model
from qwen2q.qconfig import QuantConfig
from qwen2q.quantization import quantize
from qwen2q.recipe import MIXED, Recipe, Rule

MIXED_RECIPE = Recipe((Rule("*.mlp.down_proj", "bnb-int8"), Rule("model.layers.1.*", "bnb-nf4"),
                       Rule("*", "awq-gemm", {"group_size": 32})))


def expected_format(name: str) -> str:
    if name.endswith("down_proj"):
        return "int8"
    return "nf4" if name.startswith("model.layers.1.") else "int4"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    make_hf_checkpoint(root / "src", seed=3, dtype=torch.bfloat16)
    quantize(root / "src", root / "mixed", MIXED_RECIPE, progress=False)
    for method in ("int8", "nf4", "int4"):
        quantize(root / "src", root / method, QuantConfig(method, group_size=32), progress=False)
    return root


def test_each_module_stores_exactly_what_its_format_alone_stores(converted):
    mixed = load_file(converted / "mixed" / "model.safetensors")
    single = {m: load_file(converted / m / "model.safetensors") for m in ("int8", "nf4", "int4")}
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    for name in names:
        theirs = single[expected_format(name)]
        keys = sorted(k for k in theirs if k.startswith(name + "."))
        assert keys == sorted(k for k in mixed if k.startswith(name + ".")), name
        for k in keys:
            assert mixed[k].dtype == theirs[k].dtype and torch.equal(mixed[k], theirs[k]), k
    cfg = json.loads((converted / "mixed" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == MIXED and sorted(g["format"] for g in q["groups"]) == ["awq-gemm", "bnb-int8", "bnb-nf4"]
    assert sum(len(g["modules"]) for g in q["groups"]) == len(names)
    assert cfg["qwen2q"]["method"] == "recipe" and [r["format"] for r in cfg["qwen2q"]["rules"]] == \
        ["bnb-int8", "bnb-nf4", "awq-gemm"]


def test_the_loader_builds_each_module_from_its_own_format(converted):
    model = load_model(converted / "mixed", dtype="float32")
    kinds = {"int8": "Int8Linear", "nf4": "NF4Linear", "int4": "Int4Linear"}
    for i, layer in enumerate(model.model.layers):
        for n in LINEARS:
            name = f"model.layers.{i}.{n}"
            assert type(layer.get_submodule(n)).__name__ == kinds[expected_format(name)], name
    # The oracle: the float source model holding each module's dequantized weight from its one-format model.
    singles = {m: load_model(converted / m, dtype="float32") for m in kinds}
    reference = load_model(converted / "src", dtype="float32")
    for i, layer in enumerate(reference.model.layers):
        for n in LINEARS:
            module = singles[expected_format(f"model.layers.{i}.{n}")].model.layers[i].get_submodule(n)
            layer.get_submodule(n).weight.data = module.FORMAT.dequantize(module.weight_q(), torch.float32)
            if module.bias is not None:
                layer.get_submodule(n).bias.data = module.bias.data.float()
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-4, atol=1e-4)


def test_cli_info_names_every_format_of_a_mixed_checkpoint(converted):
    from click.testing import CliRunner

    from qwen2q.cli import main

    r = CliRunner().invoke(main, ["info", str(converted / "mixed")])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.strip().startswith("quantization"))
    for phrase in ("bitsandbytes int8", "bitsandbytes 4-bit nf4", "AWQ int4 group 32", "2 linears", "6 linears"):
        assert phrase in line, (phrase, line)


def test_a_calibrated_recipe_may_keep_linears_in_full_precision(tmp_path):
    """AWQ with a skip: the skipped linear stays float (its scaled columns folded exactly), the rest AWQ."""
    make_hf_checkpoint(tmp_path / "src", seed=4)
    ids = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    report = quantize(tmp_path / "src", tmp_path / "q", QuantConfig("awq", group_size=32, skip=("lm_head", "down_proj")),
                      CalibrationSettings(ids=ids, search_tokens=64), progress=False)
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert "model.layers.0.mlp.up_proj.qweight" in stored
    assert report.quantized_weights == sum(t.numel() for k, t in load_file(tmp_path / "src" / "model.safetensors").items()
                                           if ".layers." in k and k.endswith("_proj.weight") and "down_proj" not in k)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["down_proj"]
    model = load_model(tmp_path / "q", dtype="float32")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    float_model = load_model(tmp_path / "src", dtype="float32")
    with torch.no_grad():
        drift = (model(ids[:1]) - float_model(ids[:1])).abs().mean() / float_model(ids[:1]).abs().mean()
    assert drift < 0.2


def test_gptq_onto_int8_rounds_every_row_on_its_stored_grid(tmp_path):
    """A recipe can pair GPTQ with any format that has a grid: int8's per-row grid here."""
    make_hf_checkpoint(tmp_path / "src", seed=5)
    ids = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize(tmp_path / "src", tmp_path / "q", Recipe((Rule("*", "bnb-int8", algorithm="gptq"),)),
             CalibrationSettings(ids=ids, search_tokens=64), progress=False)
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert type(load_model(tmp_path / "q").model.layers[1].mlp.up_proj).__name__ == "Int8Linear"


@pytest.mark.parametrize("recipe, message", [
    (Recipe((Rule("*.mlp.nothing", "bnb-int8"),)), "matches no linear"),
    (Recipe((Rule("*", "bnb-int8"),), skip=("lm_head", "model.layers")), "leaves no linear"),
    (Recipe((Rule("*", "awq-gemm", {"group_size": 64}),)), "down_proj.*in_features=96"),
])
def test_bad_recipes_are_refused_before_any_work(tmp_path, recipe, message):
    make_hf_checkpoint(tmp_path / "src", intermediate_size=96)
    with pytest.raises(Qwen2qError, match=message):
        quantize(tmp_path / "src", tmp_path / "q", recipe, progress=False)
    assert not (tmp_path / "q").exists()


def test_rule_checks_its_format_parameters_and_algorithm():
    with pytest.raises(Qwen2qError, match="group size 48"):
        Rule("*", "awq-gemm", {"group_size": 48})
    with pytest.raises(Qwen2qError, match="unknown algorithm"):
        Rule("*", "awq-gemm", algorithm="magic")
    with pytest.raises(Qwen2qError, match="unknown quantization format"):
        Rule("*", "fp3")
    with pytest.raises(Qwen2qError, match="no grid for GPTQ"):
        Rule("*", "bnb-nf4", algorithm="gptq")


def test_first_matching_rule_wins_and_skips_override_rules():
    recipe = Recipe((Rule("*.down_proj", "bnb-int8"), Rule("model.layers.0", "bnb-nf4"), Rule("*", "awq-gemm")),
                    skip=("lm_head", "model.layers.3.mlp"))
    assert recipe.format_for("model.layers.0.mlp.down_proj")[0].name == "bnb-int8"
    assert recipe.format_for("model.layers.0.self_attn.q_proj")[0].name == "bnb-nf4"
    assert recipe.format_for("model.layers.2.self_attn.q_proj")[0].name == "awq-gemm"
    assert recipe.format_for("model.layers.3.mlp.up_proj") is None
    assert recipe.format_for("model.layers.10.self_attn.q_proj")[0].name == "awq-gemm"  # "layers.1" is no prefix of it


def test_mixed_config_round_trips_and_bad_ones_are_refused():
    linears = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    back = Recipe.from_hf(MIXED_RECIPE.to_hf(linears))
    for name in linears:
        assert back.format_for(name) == MIXED_RECIPE.format_for(name), name
    for bad in ({"quant_method": MIXED}, {"quant_method": MIXED, "groups": [{"format": "bnb-int8", "modules": []}]},
                {"quant_method": MIXED, "groups": [{"format": "bnb-nf4", "config": {"quant_method": "awq"},
                                                    "modules": ["model.layers.0.mlp.up_proj"]}]}):
        with pytest.raises(Qwen2qError, match=MIXED):
            Recipe.from_hf(bad)


@pytest.mark.parametrize("content, args, needle", [
    ("{not json", (), "cannot read it as JSON"),
    ('{"rules": [{"pattern": "*", "format": "fp3"}]}', (), "unknown quantization format 'fp3'"),
    ('{"rules": [{"pattern": "*", "format": "bnb-int8", "bits": 3}]}', (), "rule 0 must be"),
    ('{"rules": [{"pattern": "*", "format": "bnb-int8"}]}', ("-m", "int8"), "--method (-m) or --recipe"),
    ('{"rules": [{"pattern": "*", "format": "awq-gemm"}]}', ("--group-size", "64"), "--group-size goes with --method"),
    ('{"rules": [{"pattern": "*", "format": "bnb-int8"}]}', ("--calib-samples", "8"), "no rule of this recipe calibrates"),
    ('{"rules": [{"pattern": "*.nothing", "format": "bnb-int8"}]}', (), "matches no linear"),
])
def test_cli_recipe_errors_are_one_line_before_any_work(tmp_path, content, args, needle):
    from cli_support import one_line_error, run_cli

    make_hf_checkpoint(tmp_path / "src")
    (tmp_path / "r.json").write_text(content)
    one_line_error(run_cli("quantize", tmp_path / "src", tmp_path / "q", "--recipe", tmp_path / "r.json", *args), needle)
    assert not (tmp_path / "q").exists()


def test_cli_recipe_writes_what_the_library_writes(tmp_path, converted):
    from cli_support import run_cli

    rules = [{"pattern": r.pattern, "format": r.format, "params": dict(r.params)} for r in MIXED_RECIPE.rules]
    (tmp_path / "r.json").write_text(json.dumps({"rules": rules}))
    r = run_cli("quantize", converted / "src", tmp_path / "q", "--recipe", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == (converted / "mixed" / "model.safetensors").read_bytes()


def test_compressed_tensors_ignore_entries_match_as_regular_expressions():
    from qwen2q.recipe import matches
    from qwen2q.quantizers.ct_pack import _skip_as_ignore

    assert matches("model.layers.0.mlp.down_proj", "re:.*down_proj$")
    assert not matches("model.layers.0.mlp.up_proj", "re:.*down_proj$")
    ignore = _skip_as_ignore("mlp.down_proj")
    names = ["model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj", "model.layers.3.self_attn.o_proj"]
    assert [n for n in names if matches(n, ignore)] == [n for n in names if matches(n, "mlp.down_proj")]


# --- several compressed-tensors parameter sets: one compressed-tensors config with a group each ---------------

CT_MIXED = Recipe((Rule("*.mlp.down_proj", "ct-pack", {"bits": 8, "group_size": 0, "symmetric": True}),
                   Rule("*", "ct-pack", {"bits": 4, "group_size": 32, "symmetric": False})))


def test_compressed_tensors_parameter_sets_are_config_groups_and_each_module_stores_its_own(tmp_path):
    make_hf_checkpoint(tmp_path / "src", seed=5, dtype=torch.bfloat16)
    quantize(tmp_path / "src", tmp_path / "mixed", CT_MIXED, progress=False)
    q = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and len(q["config_groups"]) == 2
    by_bits = {g["weights"]["num_bits"]: g for g in q["config_groups"].values()}
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    assert sorted(by_bits[8]["targets"]) == sorted(n for n in names if n.endswith("down_proj"))
    assert sorted(by_bits[4]["targets"]) == sorted(n for n in names if not n.endswith("down_proj"))
    assert by_bits[4]["weights"]["group_size"] == 32 and not by_bits[4]["weights"]["symmetric"]
    # the oracle: each one-parameter-set conversion of the same source stores exactly the same tensors
    for bits, params in ((8, CT_MIXED.rules[0].params), (4, CT_MIXED.rules[1].params)):
        quantize(tmp_path / "src", tmp_path / f"ct{bits}", Recipe((Rule("*", "ct-pack", params),)), progress=False)
    mixed = load_file(tmp_path / "mixed" / "model.safetensors")
    for name in names:
        single = load_file(tmp_path / ("ct8" if name.endswith("down_proj") else "ct4") / "model.safetensors")
        keys = sorted(k for k in single if k.startswith(name + "."))
        assert keys and keys == sorted(k for k in mixed if k.startswith(name + ".")), name
        assert all(torch.equal(mixed[k], single[k]) for k in keys), name
    back = Recipe.from_hf(q)
    for name in names:
        assert back.rule_for(name).params["bits"] == (8 if name.endswith("down_proj") else 4), name
    model = load_model(tmp_path / "mixed", dtype="float32")
    single8 = load_model(tmp_path / "ct8", dtype="float32")
    for i, layer in enumerate(model.model.layers):
        assert torch.equal(layer.mlp.down_proj.weight_q().packed, single8.model.layers[i].mlp.down_proj.weight_q().packed)
        assert layer.self_attn.q_proj.weight_q().bits == 4


def test_compressed_tensors_groups_by_name_win_over_a_linear_class_group():
    linear = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group"}
    down = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel"}
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": linear},
                                "group_1": {"targets": ["re:.*down_proj$"], "weights": down}}}
    recipe = Recipe.from_hf(config)
    assert recipe.rule_for("model.layers.3.mlp.down_proj").params["bits"] == 8
    assert recipe.rule_for("model.layers.3.mlp.up_proj").params["bits"] == 4
    assert recipe.rule_for("lm_head") is None or "lm_head" in recipe.skip

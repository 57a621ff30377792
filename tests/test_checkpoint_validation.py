"""Checkpoint content validation (issue 17 items 4-8, 10): every bad checkpoint is refused through the real
CLI with one `error:` line, exit 1, no traceback, and nothing outside DST changed; Python API checks
cover the rule variants quickly."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_support import one_line_error, run_cli, tree_digest
from conftest import make_hf_checkpoint
from qwen2q.config import Qwen2Config
from qwen2q.quantization import quantize as convert
from qwen2q.errors import CheckpointError, ConfigError, Qwen2qError
from qwen2q.loader import load_model
from qwen2q.qconfig import QuantConfig

IDS = torch.arange(0, 300, 7).view(1, -1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(path, transformers model) of an untied fp32 tiny checkpoint, shared read-only by the tests."""
    path = tmp_path_factory.mktemp("base")
    return path, make_hf_checkpoint(path, tie_word_embeddings=False)


@pytest.fixture
def ckpt(base, tmp_path):
    """A fresh copy of the base checkpoint at tmp_path/src."""
    src = tmp_path / "src"
    shutil.copytree(base[0], src)
    return src


def edit_tensors(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(fn(cfg)))


def refused(tmp_path, *args, needles=(), dst=None) -> str:
    """Run the CLI; assert one error line with every needle, no DST, and no file under tmp_path changed."""
    before = tree_digest(tmp_path)
    line = one_line_error(run_cli(*args), *needles)
    assert tree_digest(tmp_path) == before
    assert dst is None or not dst.exists()
    return line


def logits(model):
    with torch.no_grad():
        return model(IDS)


# --- item 4: index entries ---------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "ABSOLUTE"])
def test_index_entry_outside_the_checkpoint_is_refused(ckpt, tmp_path, entry):
    # before: '../..' opened /etc/passwd; an absolute path loaded another checkpoint and quantized it (exit 0)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(ckpt / "model.safetensors", outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    names = list(load_file(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: entry for n in names}}))
    refused(tmp_path, "quantize", ckpt, tmp_path / "dst", "-m", "int8", needles=("not a plain file name", entry),
            dst=tmp_path / "dst")
    refused(tmp_path, "info", ckpt, needles=("not a plain file name",))


@pytest.mark.parametrize("index", [{"weight_map": ["model.safetensors"]}, {"weight_map": {"a": 3}}, [], {},
                                   {"weight_map": {"model.norm.weight": ""}}])
def test_index_must_map_names_to_file_names(ckpt, index):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(ckpt)


def test_index_must_say_where_each_tensor_is(ckpt):
    names = list(load_file(ckpt / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in names[1:]}  # one stored tensor not listed
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"{names[0]}.*does not list it"):
        load_model(ckpt)
    weight_map = {n: "model.safetensors" for n in names + ["model.extra.weight"]}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        load_model(ckpt)


def test_symlinked_shards_still_load(base, tmp_path):
    # the hub cache links every file to a blob elsewhere: the name is checked, not where it resolves
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    make_hf_checkpoint(blobs, shard_size="200KB", tie_word_embeddings=False)
    snap.mkdir()
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    assert len(list(snap.glob("model-*.safetensors"))) > 1
    assert torch.equal(logits(load_model(snap)), logits(load_model(blobs)))


# --- item 5: shapes and dtypes -----------------------------------------------------------------------

def test_wrong_linear_shape_is_refused_before_quantizing(ckpt, tmp_path):
    # before: quantized with exit 0, crashed on the first forward
    edit_tensors(ckpt, lambda s: s.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(128, 128)))
    refused(tmp_path, "quantize", ckpt, tmp_path / "dst", "-m", "nf4",
            needles=("model.layers.0.mlp.down_proj.weight", "[128, 128]", "[128, 256]"), dst=tmp_path / "dst")


def test_half_size_embedding_is_refused_at_load(ckpt, tmp_path):
    # before: generated until a token id >= the stored rows appeared
    edit_tensors(ckpt, lambda s: s.__setitem__("model.embed_tokens.weight", s["model.embed_tokens.weight"][:160]))
    refused(tmp_path, "generate", ckpt, "-p", "hi", "--max-new-tokens", "2",
            needles=("model.embed_tokens.weight", "[160, 128]", "[320, 128]"))


def test_integer_weight_is_refused(ckpt, tmp_path):
    edit_tensors(ckpt, lambda s: s.__setitem__("model.layers.1.self_attn.o_proj.weight",
                                               torch.ones(128, 128, dtype=torch.int32)))
    refused(tmp_path, "generate", ckpt, "-p", "hi", "--max-new-tokens", "2",
            needles=("model.layers.1.self_attn.o_proj.weight", "int32"))


@pytest.mark.parametrize("name, shape", [("model.norm.weight", (64,)), ("model.layers.1.self_attn.k_proj.bias", (128,)),
                                         ("lm_head.weight", (320, 64)), ("model.layers.0.mlp.gate_proj.weight", (128, 256))])
def test_every_tensor_shape_is_checked(ckpt, name, shape):
    edit_tensors(ckpt, lambda s: s.__setitem__(name, torch.zeros(shape)))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[{shape[0]}"):
        load_model(ckpt)


def test_unknown_and_missing_tensors_are_named_from_the_headers(ckpt):
    edit_tensors(ckpt, lambda s: s.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight"):
        load_model(ckpt)


@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
    """{method: path} of the base checkpoint quantized with each round-to-nearest method."""
    out = {}
    for method in ("nf4", "int8", "int4"):
        out[method] = tmp_path_factory.mktemp("q") / method
        convert(base[0], out[method], QuantConfig(method), progress=False)
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "q"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("method, name, bad", [
    ("int8", "model.layers.0.mlp.up_proj.SCB", torch.ones(128)),  # [256] for out_features 256
    ("int8", "model.layers.0.mlp.up_proj.weight", torch.ones(256, 64, dtype=torch.int8)),
    ("int4", "model.layers.1.mlp.down_proj.scales", torch.ones(2, 64, dtype=torch.float16)),
    ("nf4", "model.layers.0.self_attn.q_proj.weight.absmax", torch.ones(10, dtype=torch.uint8)),
    ("nf4", "model.layers.0.input_layernorm.weight", torch.ones(128, dtype=torch.int64)),
])
def test_quantized_tensors_are_checked_against_the_linear(quantized, tmp_path, method, name, bad):
    q = _copy(quantized[method], tmp_path)
    edit_tensors(q, lambda s: s.__setitem__(name, bad))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(q)


def test_nf4_quant_state_shape_must_be_the_linears(quantized, tmp_path):
    # the element counts still agree when [out, in] is transposed: only the JSON says which it is
    q = _copy(quantized["nf4"], tmp_path)
    key = "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"

    def transpose(s):
        state = json.loads(bytes(s[key].tolist()).decode())
        state["shape"] = state["shape"][::-1]
        s[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    edit_tensors(q, transpose)
    one_line_error(run_cli("generate", q, "-p", "hi", "--max-new-tokens", "2"),
                   "model.layers.0.mlp.down_proj", "[256, 128]", "[128, 256]")


# --- item 6: non-finite values -----------------------------------------------------------------------

def _nan_norm(path):
    def f(s):
        s["model.norm.weight"][3] = float("nan")
    edit_tensors(path, f)


def test_nan_norm_is_refused_by_quantize_before_writing(ckpt, tmp_path):
    # before: quantized with exit 0
    _nan_norm(ckpt)
    refused(tmp_path, "quantize", ckpt, tmp_path / "dst", "-m", "int8", needles=("model.norm.weight", "NaN"),
            dst=tmp_path / "dst")


def test_nan_is_refused_at_load_and_allowed_on_request(ckpt, tmp_path):
    # before: generated and evaluated with exit 0 ("ppl nan")
    _nan_norm(ckpt)
    refused(tmp_path, "generate", ckpt, "-p", "hi", "--max-new-tokens", "2",
            needles=(str(ckpt), "model.norm.weight", "--allow-non-finite"))
    model = load_model(ckpt, allow_non_finite=True)
    assert torch.isnan(model.model.norm.weight[3]) and not torch.isnan(model.model.norm.weight[:3]).any()


def test_eval_fails_loudly_on_non_finite_logits(ckpt, tmp_path):
    _nan_norm(ckpt)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    refused(tmp_path, "eval", ckpt, "--dataset", text, "--seq-len", "16", "--max-windows", "2", "--allow-non-finite",
            needles=(str(ckpt), "non-finite logits", "window 1 of 2"))


def test_quantize_allow_non_finite_copies_the_nan(ckpt, tmp_path):
    _nan_norm(ckpt)
    with pytest.raises(Qwen2qError, match="model.norm.weight"):
        convert(ckpt, tmp_path / "refused", QuantConfig("int8"), progress=False)
    assert not (tmp_path / "refused").exists()
    convert(ckpt, tmp_path / "dst", QuantConfig("int8"), progress=False, allow_non_finite=True)
    assert torch.isnan(load_file(tmp_path / "dst" / "model.safetensors")["model.norm.weight"][3])


def test_a_value_that_overflows_the_load_dtype_is_refused(ckpt):
    edit_tensors(ckpt, lambda s: s["model.layers.0.post_attention_layernorm.weight"].__setitem__(0, 1e6))
    with pytest.raises(CheckpointError, match="post_attention_layernorm.*float16's range"):
        load_model(ckpt, dtype="float16")
    assert load_model(ckpt, dtype="float32").model.layers[0].post_attention_layernorm.weight[0] == 1e6


# --- item 7: config.json -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("hidden_size", 0), ("hidden_size", "abc"), ("hidden_size", 12.5), ("hidden_size", True), ("hidden_size", -128),
    ("vocab_size", None), ("num_key_value_heads", 0), ("num_attention_heads", 3), ("num_attention_heads", 5),
    ("head_dim", 33), ("rms_norm_eps", 0), ("rms_norm_eps", "1e-6"), ("rope_parameters", "yarn"),
    ("rope_parameters", {"rope_type": "yarn", "factor": "x"}), ("rope_parameters", {"rope_theta": -1}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 0}),
    ("tie_word_embeddings", "false"), ("quantization_config", [1]), ("max_position_embeddings", 0),
])
def test_bad_config_fields_are_named(base, field, value):
    cfg = json.loads((base[0] / "config.json").read_text())
    cfg[field] = value
    with pytest.raises(ConfigError) as e:
        Qwen2Config.from_dict(cfg)
    wanted = {"rope_parameters": ("rope", "factor", "theta", "original_max")}.get(field, (field,))
    assert any(w in str(e.value) for w in wanted), str(e.value)


@pytest.mark.parametrize("edit, needle", [(lambda c: [c], "not an object"),
                                          (lambda c: {**c, "hidden_size": "abc"}, "hidden_size"),
                                          (lambda c: {**c, "num_key_value_heads": 0}, "num_key_value_heads")])
def test_bad_config_is_one_line_in_the_cli(ckpt, tmp_path, edit, needle):
    # before: AttributeError / TypeError tracebacks, or exit 0 with num_key_value_heads 0
    edit_config(ckpt, edit)
    refused(tmp_path, "info", ckpt, needles=("config.json", needle))


# --- item 8: eval across vocabularies ----------------------------------------------------------------

def test_eval_refuses_a_reference_with_another_vocabulary(ckpt, tmp_path):
    # before: a RuntimeError/IndexError traceback after the reference pass
    other = tmp_path / "other"
    make_hf_checkpoint(other, vocab_size=300)
    refused(tmp_path, "eval", ckpt, "--reference", other, "--seq-len", "16", "--max-windows", "1",
            needles=("vocab_size 320", "300"))


# --- item 10: pickles ----------------------------------------------------------------------------------

def test_legacy_pickle_is_one_line(ckpt, tmp_path, base):
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    refused(tmp_path, "generate", ckpt, "-p", "hi", "--max-new-tokens", "2", "--allow-pickle",
            needles=("pytorch_model.bin", "zip"))


@pytest.mark.parametrize("content", ["garbage", "not_a_dict", "truncated"])
def test_unreadable_pickles_are_checkpoint_errors(ckpt, content):
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    f = ckpt / "pytorch_model.bin"
    torch.save([1, 2] if content == "not_a_dict" else state, f)
    if content == "truncated":
        f.write_bytes(f.read_bytes()[: os.path.getsize(f) // 2])
    elif content == "garbage":
        f.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(ckpt, allow_pickle=True)

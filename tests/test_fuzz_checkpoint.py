"""Fuzzing a small checkpoint (issue 17): random truncations and byte flips of its safetensors header and
data, random values for its config.json size fields, random index weight_maps.  Never a traceback (in
process: only Qwen2qError; through the CLI: one `error:` line), and never an output that loads but is wrong.

What "wrong" means, judged by readers independent of qwen2q's loader:
  * bytes: a flip in the data legitimately changes values, so a mutated file that loads must (a) hold
    what the safetensors library itself reads from it, tensor for tensor, (b) with the original's
    names, shapes and dtypes, and (c) only finite values.
  * config: a mutated config that loads must describe these tensors: transformers' own Qwen2, built from
    the same config.json, must accept the state dict strictly and give the same logits.
  * index: a mutated index that loads must say truly which shard holds each tensor, and the model must
    be the original one.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from cli_support import one_line_error, run_cli
from conftest import make_hf_checkpoint
from qwen2q.errors import Qwen2qError
from qwen2q.loader import load_model

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             tie_word_embeddings=False)
IDS = torch.tensor([[1, 5, 17, 42, 99, 250, 7, 3]])


def fuzz(examples: int) -> settings:
    """Sized so that this file runs in well under a minute on 2 cores; no example database left behind."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Workspace:
    """A fresh directory per example (hypothesis runs examples one after another)."""

    def __init__(self):
        self.root, self.n = Path(tempfile.mkdtemp(prefix="qwen2q-fuzz-")), 0

    def fresh(self, like: Path, skip=()) -> Path:
        self.n += 1
        d = self.root / str(self.n)
        shutil.copytree(like, d, ignore=shutil.ignore_patterns(*skip))
        shutil.rmtree(self.root / str(self.n - 1), ignore_errors=True)
        return d


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(single-file checkpoint, sharded checkpoint, original tensors, workspace)."""
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    make_hf_checkpoint(single, **SMALL)
    make_hf_checkpoint(sharded, shard_size="50KB", **SMALL)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ws = Workspace()
    yield single, sharded, load_file(single / "model.safetensors"), ws
    shutil.rmtree(ws.root, ignore_errors=True)


def loads_or_refuses(path: Path, **kw):
    """The model, or None when qwen2q refused with a Qwen2qError (anything else fails the test)."""
    try:
        model = load_model(path, dtype="float32", **kw)
    except Qwen2qError as e:
        assert "\n" not in str(e), str(e)  # the CLI prints it as one line
        event(f"refused: {type(e).__name__}")
        return None
    event("loaded")
    return model


def header_length(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# --- bytes ---------------------------------------------------------------------------------------------

@st.composite
def byte_mutations(draw, size: int, header_end: int):
    """('truncate', n) or a list of (position, xor mask) flips, aimed at the header or at the data."""
    if draw(st.integers(0, 4)) == 0:
        return "truncate", draw(st.integers(0, size - 1))
    where = draw(st.sampled_from(["header", "data", "anywhere"]))
    lo, hi = {"header": (0, header_end - 1), "data": (header_end, size - 1), "anywhere": (0, size - 1)}[where]
    return "flip", draw(st.lists(st.tuples(st.integers(lo, hi), st.integers(1, 255)), min_size=1, max_size=3))


def apply(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[:arg]
    b = bytearray(data)
    for pos, mask in arg:
        b[pos] ^= mask
    return bytes(b)


@fuzz(400)
@given(data=st.data())
def test_byte_flips_and_truncations(small, data):
    single, _, original, ws = small
    f = single / "model.safetensors"
    raw = f.read_bytes()
    mutation = data.draw(byte_mutations(len(raw), header_length(f)))
    d = ws.fresh(single, skip=("model.safetensors",))
    (d / "model.safetensors").write_bytes(apply(raw, mutation))
    model = loads_or_refuses(d)
    if model is None:
        return
    stored = load_file(d / "model.safetensors")  # the safetensors library's own reading of the file
    assert {n: (t.shape, t.dtype) for n, t in stored.items()} == {n: (t.shape, t.dtype) for n, t in original.items()}
    assert all(torch.isfinite(t).all() for t in stored.values())
    state = model.state_dict()
    for name, t in stored.items():
        assert torch.equal(state[name], t), name


# --- config --------------------------------------------------------------------------------------------

SIZE_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps"]
ODD_VALUES = st.one_of(st.integers(-3, 400), st.sampled_from([16, 32, 64, 2, 1, 0]), st.floats(allow_nan=True),
                       st.booleans(), st.none(), st.text(max_size=3), st.lists(st.integers(0, 4), max_size=2))


def transformers_logits(cfg: dict, state: dict) -> torch.Tensor:
    """Logits of transformers' Qwen2 built from `cfg`, loading `state` strictly (raises if it does not fit)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).float().eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(IDS).logits


@fuzz(250)
@given(changes=st.dictionaries(st.sampled_from(SIZE_FIELDS), ODD_VALUES, min_size=1, max_size=2))
def test_random_config_sizes(small, changes):
    single, _, original, ws = small
    base_cfg = json.loads((single / "config.json").read_text())
    d = ws.fresh(single)
    cfg = {**base_cfg, **changes}
    (d / "config.json").write_text(json.dumps(cfg))
    model = loads_or_refuses(d)
    if model is None:
        return
    # accepted: transformers must agree that these tensors are this config's model, with the same logits
    with torch.no_grad():
        ours = model(IDS)
    # (qwen2q reads a null field as absent; transformers needs it absent to take its default)
    cfg = {k: v for k, v in cfg.items() if not (k in changes and v is None)}
    if "rms_norm_eps" in cfg:  # JSON 1 is a float field's 1.0; transformers wants a float
        cfg["rms_norm_eps"] = float(cfg["rms_norm_eps"])
    assert torch.allclose(ours, transformers_logits(cfg, original), atol=1e-4, rtol=1e-4), changes


# --- index ---------------------------------------------------------------------------------------------

@fuzz(200)
@given(data=st.data())
def test_random_index_weight_maps(small, data):
    _, sharded, original, ws = small
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    truth = {}
    for shard in sorted(sharded.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as sf:
            truth.update({n: shard.name for n in sf.keys()})
    names, shards = sorted(truth), sorted(set(truth.values()))
    entries = st.one_of(st.sampled_from(shards), st.sampled_from(
        ["../" + shards[0], str(sharded / shards[0]), "", ".", "..", "sub/" + shards[0], "config.json",
         "tokenizer.json", shards[0] + "\x00", "model.safetensors"]), st.text(max_size=8), st.integers(), st.none())

    reassign = data.draw(st.dictionaries(st.sampled_from(names), entries, max_size=4))
    drop = data.draw(st.lists(st.sampled_from(names), max_size=2))
    bogus_key = data.draw(st.booleans())
    d = ws.fresh(sharded)
    weight_map = {n: s for n, s in truth.items() if n not in drop}
    weight_map.update(reassign)
    if bogus_key:
        weight_map["model.layers.7.mlp.up_proj.weight"] = shards[0]
    (d / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    model = loads_or_refuses(d)
    if model is None:
        return
    assert weight_map == truth  # it loaded only because the index is true
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in original.items())


# --- the real CLI --------------------------------------------------------------------------------------

@fuzz(6)
@given(data=st.data(), config_change=st.one_of(st.none(), st.tuples(st.sampled_from(SIZE_FIELDS), ODD_VALUES)))
def test_cli_never_shows_a_traceback(small, data, config_change):
    single, _, _, ws = small
    f = single / "model.safetensors"
    raw, cfg = f.read_bytes(), json.loads((single / "config.json").read_text())
    mutation = data.draw(byte_mutations(len(raw), header_length(f)))
    d = ws.fresh(single, skip=("model.safetensors",))
    (d / "model.safetensors").write_bytes(apply(raw, mutation))
    if config_change:
        (d / "config.json").write_text(json.dumps({**cfg, config_change[0]: config_change[1]}))
    r = run_cli("generate", d, "-p", "hi", "--max-new-tokens", "2")
    if r.returncode != 0:
        one_line_error(r)
    else:
        assert "Traceback" not in r.stderr


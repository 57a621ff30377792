"""qwen2q's model against transformers' Qwen2ForCausalLM, both loaded from the same saved directory."""
import json

import pytest
import torch

from conftest import make_hf_checkpoint
from qwen2q.loader import load_model

CASES = {
    "tied-gqa": dict(tie_word_embeddings=True),
    "untied-gqa": dict(tie_word_embeddings=False, num_key_value_heads=1),
    "untied-mha": dict(tie_word_embeddings=False, num_key_value_heads=4),
    "yarn": dict(tie_word_embeddings=True,
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "sliding-window": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
}


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(path, seed=len(request.param), **CASES[request.param])
    return hf, load_model(path, dtype="float32")


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 320, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert (ref - got).abs().max().item() <= 1e-4


def test_kv_cache_decode_equals_full_forward(pair):
    _, ours = pair
    ids = torch.randint(0, 320, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(1, 80)
        pieces = [ours(ids[:, :30], cache=cache)]  # prefill
        pieces += [ours(ids[:, t : t + 1], cache=cache) for t in range(30, 70)]  # one token at a time
        pieces.append(ours(ids[:, 70:], cache=cache))  # a chunk after a cached prefix
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-4


def test_32_greedy_tokens_equal_transformers(pair):
    from qwen2q.generation import SamplingParams, generate_ids

    hf, ours = pair
    prompt = [5, 17, 42, 99, 123, 7]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = generate_ids(ours, prompt, SamplingParams(max_new_tokens=32), stop_ids=[])
    assert got == ref


def test_old_config_dialect_gives_same_model(tmp_path):
    """rope_theta / rope_scaling / torch_dtype (transformers 4) read like rope_parameters / dtype (5)."""
    make_hf_checkpoint(tmp_path, rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
                       rope_theta=50000.0)
    new = load_model(tmp_path, dtype="float32")
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params["rope_theta"]
    cfg["rope_scaling"] = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = load_model(tmp_path, dtype="float32")
    assert old.config.rope == new.config.rope and old.config.rope.theta == 50000.0
    ids = torch.arange(100).view(1, 100) % 320
    with torch.no_grad():
        assert torch.equal(old(ids), new(ids))


def test_dynamic_yarn_leaves_short_inputs_unscaled(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    make_hf_checkpoint(tmp_path / "plain")
    make_hf_checkpoint(tmp_path / "yarn", rope_scaling=yarn)
    cfg = json.loads((tmp_path / "yarn" / "config.json").read_text())
    cfg["rope_parameters"]["dynamic"] = True
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(cfg))
    plain = load_model(tmp_path / "plain", dtype="float32")
    dynamic = load_model(tmp_path / "yarn", dtype="float32")
    static = make_hf_checkpoint(tmp_path / "static", rope_scaling=yarn)
    short = torch.arange(64).view(1, 64) % 320
    long = torch.arange(100).view(1, 100) % 320
    with torch.no_grad():
        assert torch.equal(dynamic(short), plain(short))
        assert (dynamic(long) - static(long).logits).abs().max().item() <= 1e-4
        assert not torch.allclose(dynamic(long), plain(long))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_fp32(hf_tiny, dtype):
    path, hf = hf_tiny
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        got = load_model(path, dtype=dtype)(ids).float()
    assert load_model(path, dtype=dtype).lm_head.weight.dtype == getattr(torch, dtype)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(hf_tiny):
    path, hf = hf_tiny
    ids = torch.randint(0, 320, (1, 64))
    with torch.no_grad():
        got = load_model(path, device="cuda", dtype="float32")(ids.cuda()).cpu()
        assert (got - hf(ids).logits).abs().max().item() <= 1e-3

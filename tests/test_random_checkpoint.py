"""dev random-checkpoint (dev/qwen2q_dev/tools/random_checkpoint.py) writes a sharded checkpoint that qwen2q (and its index) read like a real one."""
import json

import pytest
import torch

import dev_modules  # noqa: F401  (dev/ on sys.path)
from qwen2q.loader import load_model
from qwen2q_dev.tools import random_checkpoint


def test_sharded_random_checkpoint_loads_with_the_requested_shapes(tmp_path, monkeypatch):
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    monkeypatch.setitem(random_checkpoint.SHAPES, "tiny", tiny)
    total = random_checkpoint.write(tmp_path, "tiny", None, shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == total == 2 * sum(
        torch.Size(shape).numel() for _, shape in random_checkpoint.tensor_shapes(random_checkpoint.config_for("tiny")))
    model = load_model(tmp_path, dtype="float32")
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 128)
    assert model.lm_head.weight.shape == (256, 64) and model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(10)[None])).all()


def test_layers_keeps_the_first_decoder_layers_at_their_real_shapes(tmp_path, monkeypatch):
    tiny = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    monkeypatch.setitem(random_checkpoint.SHAPES, "tiny", tiny)
    random_checkpoint.write(tmp_path, "tiny", None, layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == config["max_window_layers"] == 1
    model = load_model(tmp_path, dtype="float32")
    assert len(model.model.layers) == 1 and model.model.layers[0].mlp.up_proj.weight.shape == (96, 64)
    with pytest.raises(ValueError, match="layers must be 1..4"):
        random_checkpoint.write(tmp_path / "bad", "tiny", None, layers=5)
    assert not (tmp_path / "bad").exists()

"""Shared fixtures: tiny random Qwen2 checkpoints written by transformers (the reference implementation)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def shared_data() -> Path | None:
    """The shared evaluation data folder (QWEN2Q_DATA, else ../shared/data beside the repo), if present."""
    from qwen2q.textdata import data_folder

    return data_folder()


def tiny_tokenizer_files(path: Path) -> None:
    """Write a small byte-level BPE tokenizer with ChatML specials and a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "def square(x):\n    return x * x\n"] * 50
    tok.train_from_iterator(text, trainer)
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "bos_token": None, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))


def make_hf_checkpoint(path: Path, seed: int = 0, dtype=torch.float32, shard_size=None, **overrides):
    """Save a random transformers Qwen2ForCausalLM (plus tokenizer) to `path`; return the HF model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**{**TINY, **overrides})
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    # transformers initialises biases to zero; random biases make the q/k/v bias path count.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    tiny_tokenizer_files(path)
    return model


@pytest.fixture
def hf_tiny(tmp_path):
    """(path, transformers model) of a tied, GQA tiny model in fp32."""
    return tmp_path, make_hf_checkpoint(tmp_path, tie_word_embeddings=True)


class FixedLogits:
    """A stand-in model: the logits for window i are table[i] ([T, V]) whatever the input."""

    def __init__(self, table):
        self.table, self.calls = table, 0

    def __call__(self, ids):
        out = self.table[self.calls % len(self.table)][None].float()
        self.calls += 1
        return out

"""The embedded default model, qwen2q/assets/qwen2-tiny: a Hugging Face Qwen2 directory that transformers and
qwen2q load alike, with a Qwen2-style byte-level BPE tokenizer and ChatML template.

The checks on the shipped files need nothing outside the repository; the perplexity check reads the
shared corpora ($QWEN2Q_DATA, else ../shared/data next to the repository root) and skips without them.
"""
import json
import unicodedata
from pathlib import Path

import pytest
import torch

import qwen2q
from qwen2q.loader import load_model

TINY = Path(qwen2q.__file__).resolve().parent / "assets" / "qwen2-tiny"
REPO_ROOT = Path(__file__).resolve().parent.parent
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEXTS = [
    "Hello, world! It's a test: we'll see, they've gone, I'm here, you're there, she'd know.",
    "Grüße aus Köln; naïve café; Ελληνικά; Русский текст; 日本語のテキスト; 한국어; עברית; العربية",
    "emoji 😀👍🏽🇩🇪 and math ∑∫√∞ ≤ ≥ ≠ and dashes — – … “quotes” ‘single’ «guillemets»",
    "def f(x: int) -> dict:\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x != 0:\r\n\t\tpass\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "   leading spaces, trailing spaces   \n\n\n   \t \t\n\n  ",
    "numbers 3.14159 1,000,000 0x1F 1e-10 2024-01-31 12:34:56",
    "control \x00\x07\x1b[0m chars, zero\u200bwidth, nbsp\u00a0here, BOM\ufeff",
    "",
    " ",
    "\n",
    "a" * 300,
]


def data_dir() -> Path | None:
    from conftest import shared_data

    return shared_data()


@pytest.fixture(scope="module")
def config():
    return json.loads((TINY / "config.json").read_text())


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TINY / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok_config():
    return json.loads((TINY / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, dtype="float32")


# ------------------------------------------------------------------------------------ the files


def test_directory_layout_and_size():
    names = {p.name for p in TINY.iterdir()}
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert f in names, f
    total = sum(p.stat().st_size for p in TINY.iterdir() if p.is_file())
    assert total <= 16 * 2**20, f"{total} bytes"


def test_config_is_a_qwen2_checkpoint(config):
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert config["use_sliding_window"] is False
    assert "rope_theta" in config
    assert config["hidden_size"] == 256 and config["intermediate_size"] == 768
    assert 4 <= config["num_hidden_layers"] <= 6
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["vocab_size"] % 128 == 0 and 4096 <= config["vocab_size"] <= 8192


def test_weights_are_bf16_with_tied_head_and_128_aligned_linears(config):
    from safetensors import safe_open

    with safe_open(str(TINY / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert "lm_head.weight" not in names
        for name in names:
            t = f.get_slice(name)
            assert t.get_dtype() == "BF16", name
            if name.endswith("proj.weight"):
                out_f, in_f = t.get_shape()
                assert out_f % 128 == 0 and in_f % 128 == 0, (name, out_f, in_f)
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert f"model.layers.0.self_attn.{proj}.bias" in names
    m = load_model(TINY)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_special_token_ids_agree_everywhere(tok, config, tok_config):
    gen = json.loads((TINY / "generation_config.json").read_text())
    eot, im_start, im_end = (tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert None not in (eot, im_start, im_end)
    assert tok.get_vocab_size() == config["vocab_size"]
    assert gen["eos_token_id"] == [im_end, eot]
    assert gen["pad_token_id"] == eot and gen["bos_token_id"] == eot
    assert config["eos_token_id"] == im_end and config["bos_token_id"] == eot
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["pad_token"] == "<|endoftext|>"
    decoder = {int(k): v["content"] for k, v in tok_config["added_tokens_decoder"].items()}
    assert decoder == {eot: "<|endoftext|>", im_start: "<|im_start|>", im_end: "<|im_end|>"}


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_pipeline_is_qwen2s():
    spec = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"]["type"] == "NFC"
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == QWEN2_SPLIT_PATTERN
    assert split["behavior"] == "Isolated" and split["invert"] is False
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is False


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_round_trips(tok, text):
    assert unicodedata.is_normalized("NFC", text)
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.get_vocab_size() for i in ids)


def test_tokenizer_normalizes_to_nfc_and_keeps_specials(tok):
    assert tok.decode(tok.encode("cafe\u0301").ids) == "caf\u00e9"  # as Qwen2's tokenizer does
    text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    ids = tok.encode(text).ids
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.token_to_id("<|im_end|>") in ids and ids[-1] == tok.token_to_id("<|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nhi\n"


def test_chat_template_renders_chatml(tok_config):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tok_config["chat_template"])
    messages = [
        {"role": "system", "content": "You are a tiny model."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert template.render(messages=messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a tiny model.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(messages=messages[1:], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_autotokenizer_encodes_the_same_ids(tok, tok_config):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(TINY))
    chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for text in TEXTS + [chat]:
        assert auto(text)["input_ids"] == tok.encode(text).ids, repr(text)
        assert auto.decode(tok.encode(text).ids, skip_special_tokens=True) == tok.decode(tok.encode(text).ids)
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    rendered = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------- model


def test_transformers_logits_match_qwen2q(model, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(TINY)).float().eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    text = (TINY / "README.md").read_text(encoding="utf-8")
    real = torch.tensor(tok.encode(text).ids[:512])[None]
    rand = torch.randint(0, model.config.vocab_size, (2, 97), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for ids in (real, rand):
            ours = model(ids)
            theirs = hf(ids).logits
            assert ours.dtype == theirs.dtype == torch.float32
            assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_continuation_is_english_like(model, tok):
    """Not a quality bar, a smoke test: the model's own next-token choices mostly decode to words."""
    ids = torch.tensor(tok.encode("The city is located in the").ids)[None]
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    out = tok.decode(ids[0].tolist())
    assert out.startswith("The city is located in the") and sum(c.isalpha() for c in out) > len(out) // 2


@pytest.mark.slow
def test_far_below_unigram_on_wikitext(model, tok):
    d = data_dir()
    if d is None or not (d / "wikitext-2-raw" / "wiki.test.raw").is_file() or not (d / "calib").is_dir():
        pytest.skip("shared data (QWEN2Q_DATA or ../shared/data) not found")
    from qwen2q.evals.perplexity import perplexity, unigram_perplexity
    import dev_modules  # noqa: F401  (dev/ on sys.path)
    from qwen2q_dev.tools.train_tiny import read_documents

    eot = tok.token_to_id("<|endoftext|>")
    train_ids = []
    for name in ("wiki.utf8", "c4.utf8", "technical.utf8"):
        for e in tok.encode_batch(read_documents(d / "calib" / name)):
            train_ids += [*e.ids, eot]
    counts = torch.bincount(torch.tensor(train_ids), minlength=tok.get_vocab_size())
    ids = torch.tensor(tok.encode((d / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")).ids)
    seq_len = model.config.max_position_embeddings
    m = perplexity(model, ids, seq_len, max_windows=8)
    u = unigram_perplexity(counts, ids, seq_len=seq_len, max_windows=8)
    assert m["tokens"] == u["tokens"] == 8 * (seq_len - 1)
    assert m["ppl"] < u["ppl"] / 2, (m, u)

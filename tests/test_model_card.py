"""A quantized checkpoint's README.md says what it is, keeps the source's license and card."""
import pytest

from conftest import make_hf_checkpoint
from qwen2q.model_card import split_front_matter
from qwen2q.qconfig import QuantConfig
from qwen2q.quantization import quantize

SOURCE_CARD = "---\nlicense: mit\ntags:\n  - demo\n---\n\n# My model\n\nTrained on things.\n"


@pytest.mark.parametrize("card", [SOURCE_CARD, None, "---\nbase_model: org/base\n---\nhello\n"])
def test_card_says_what_the_checkpoint_is_and_keeps_the_source_card(tmp_path, card):
    src = tmp_path / "my-model"
    make_hf_checkpoint(src)
    if card is not None:
        (src / "README.md").write_text(card)
    report = quantize(src, tmp_path / "q", QuantConfig("int4", group_size=32), progress=False)
    written = (tmp_path / "q" / "README.md").read_text()
    front, body = split_front_matter(written)
    assert "base_model_relation: quantized" in front
    assert f"{report.bits_per_weight:.3f} bits per quantized weight" in body and "int4 g32" in body
    assert "AutoAWQ" in body and "## Original model card" in body
    if card == SOURCE_CARD:
        assert front[:3] == ["license: mit", "tags:", "  - demo"] and "base_model: my-model" in front
        assert body.rstrip().endswith("# My model\n\nTrained on things.")
    elif card is None:
        assert "came without a model card" in body and "base_model: my-model" in front
    else:
        assert [line for line in front if line.startswith("base_model:")] == ["base_model: org/base"]
    assert (src / "README.md").exists() == (card is not None)  # the source is untouched

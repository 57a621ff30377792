"""llm-compressor's own weight-only quantization of a checkpoint, saved compressed, for qwen2q to read.

    PEERS/llmc/bin/python dev/qwen2q_dev/research/peers/llmc_quantize.py SRC DST SCHEME

Runs in the llmc venv of setup.sh (llmcompressor 0.14), not the project's; tests/test_llmcompressor.py
calls it.  SCHEME is one of llm-compressor's preset schemes (W4A16: symmetric, groups of 128;
W4A16_ASYM; W8A16: symmetric, one scale per row), applied data-free (`oneshot` with a
`QuantizationModifier` on every Linear but lm_head) and saved with `save_compressed=True`: the
`pack-quantized` checkpoint llm-compressor users publish.
"""
import sys


def main():
    src, dst, scheme = sys.argv[1:4]
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(src)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    model.save_pretrained(dst, save_compressed=True)
    tokenizer.save_pretrained(dst)


if __name__ == "__main__":
    main()

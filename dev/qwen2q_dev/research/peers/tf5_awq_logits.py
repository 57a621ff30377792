"""transformers 5 + gptqmodel load an AWQ checkpoint on CPU and write its logits for given token ids.

    PEERS/gptq/bin/python dev/qwen2q_dev/research/peers/tf5_awq_logits.py MODEL IDS.json OUT.pt

Runs in the gptq venv of setup.sh (transformers 5.24, gptqmodel 7.6: transformers 5 reads AWQ only through
gptqmodel); tests/test_transformers_awq.py calls it.  IDS.json: [[token ids], ...] (one row each);
OUT.pt: {"logits": [fp32 [T, vocab] per row], "module": the class of a quantized linear, "dtype": the model's}.
"""
import json
import sys


def main():
    model_dir, ids_file, out_file = sys.argv[1:4]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    rows = json.load(open(ids_file))
    with torch.inference_mode():
        logits = [model(torch.tensor([r])).logits[0].float() for r in rows]
    module = type(model.model.layers[0].self_attn.q_proj)
    torch.save({"logits": logits, "module": f"{module.__module__}.{module.__name__}", "dtype": str(model.dtype)},
               out_file)


if __name__ == "__main__":
    main()

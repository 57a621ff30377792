"""KL, top-1 and perplexity of evals.drift against a float64 computation done here by hand."""
import math

import torch

from qwen2q.evals.drift import compare


class FixedLogits:
    """A stand-in model: the logits for window i are table[i] ([T, V]) whatever the input."""

    def __init__(self, table):
        self.table, self.calls = table, 0

    def __call__(self, ids):
        out = self.table[self.calls % len(self.table)][None].float()
        self.calls += 1
        return out


def test_compare_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    V, L, W = 11, 6, 3
    ref = torch.randn(W, L, V, generator=g, dtype=torch.float64) * 2
    cand = ref + 0.3 * torch.randn(W, L, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (W * L + 2,), generator=g)
    got = compare(FixedLogits(ref), FixedLogits(cand), ids, L, chunk=2)

    kl = nll_r = nll_c = top = 0.0
    for w in range(W):
        p, q = ref[w, :-1].softmax(-1), cand[w, :-1].softmax(-1)
        targets = ids[w * L + 1 : (w + 1) * L]
        kl += (p * (p.log() - q.log())).sum().item()
        nll_r -= p.log()[torch.arange(L - 1), targets].sum().item()
        nll_c -= q.log()[torch.arange(L - 1), targets].sum().item()
        top += (p.argmax(-1) == q.argmax(-1)).sum().item()
    n = W * (L - 1)
    assert got["tokens"] == n and got["windows"] == W
    assert math.isclose(got["kl"], kl / n, rel_tol=1e-5)
    assert math.isclose(got["ppl_reference"], math.exp(nll_r / n), rel_tol=1e-5)
    assert math.isclose(got["ppl"], math.exp(nll_c / n), rel_tol=1e-5)
    assert got["top1"] == top / n
    assert math.isclose(got["ppl_ratio"], got["ppl"] / got["ppl_reference"])


def test_identical_models_have_zero_drift():
    logits = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(1))
    got = compare(FixedLogits(logits), FixedLogits(logits), torch.randint(0, 5, (16,)), 8)
    assert got["kl"] == 0 and got["top1"] == 1.0 and got["ppl_delta"] == 0

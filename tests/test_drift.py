"""KL, top-1 and perplexity of evals.drift against a float64 computation done here by hand."""
import math

import pytest
import torch

from conftest import FixedLogits
from qwen2q.evals.drift import compare, paired_nll_difference


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


def test_per_window_figures_and_delta_se_match_float64_reference():
    g = torch.Generator().manual_seed(2)
    V, L, W = 7, 5, 4
    ref = torch.randn(W, L, V, generator=g, dtype=torch.float64)
    cand = ref + 0.5 * torch.randn(W, L, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (W * L,), generator=g)
    got = compare(FixedLogits(ref), FixedLogits(cand), ids, L, chunk=3)

    gaps, kls = [], []
    for w in range(W):
        p, q = ref[w, :-1].log_softmax(-1), cand[w, :-1].log_softmax(-1)
        t = ids[w * L + 1 : (w + 1) * L]
        nll_r, nll_c = -p[torch.arange(L - 1), t].mean().item(), -q[torch.arange(L - 1), t].mean().item()
        assert math.isclose(got["window_nll_reference"][w], nll_r, rel_tol=1e-5)
        assert math.isclose(got["window_nll"][w], nll_c, rel_tol=1e-5)
        kls.append((p.exp() * (p - q)).sum(-1).mean().item())
        gaps.append(nll_c - nll_r)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got["window_kl"], kls))
    mean = sum(gaps) / W
    sd = math.sqrt(sum((x - mean) ** 2 for x in gaps) / (W - 1))
    assert math.isclose(got["ppl_delta_se"], got["ppl"] * sd / math.sqrt(W), rel_tol=1e-4)


def test_paired_difference_is_mean_and_standard_error_of_the_gaps():
    a, b = [2.0, 3.0, 4.5], [1.0, 2.5, 3.0]
    got = paired_nll_difference(a, b)
    gaps = [1.0, 0.5, 1.5]
    sd = math.sqrt(sum((x - 1.0) ** 2 for x in gaps) / 2)
    assert math.isclose(got["mean"], 1.0) and math.isclose(got["se"], sd / math.sqrt(3)) and got["windows"] == 3
    assert math.isnan(paired_nll_difference([1.0], [0.5])["se"])
    with pytest.raises(ValueError):
        paired_nll_difference([1.0, 2.0], [1.0])

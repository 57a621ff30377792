"""qwen2q.evals.perplexity against cases worked out by hand with stub models."""
import math

import pytest
import torch

from qwen2q.evals.perplexity import perplexity, scored_tokens, unigram_perplexity


class FixedLogits(torch.nn.Module):
    """A stub LM: the same logits vector at every position, whatever the input; records its inputs."""

    def __init__(self, row, dtype=torch.float32):
        super().__init__()
        self.row = torch.tensor(row, dtype=dtype)
        self.calls = []

    def forward(self, input_ids):
        self.calls.append(input_ids.clone())
        B, T = input_ids.shape
        return self.row.expand(B, T, -1).clone()


IDS = torch.tensor([3, 0, 1, 0, 2, 0, 0, 3, 1, 2])  # 10 tokens: two windows of 4, two left over


def test_uniform_logits_give_vocab_size():
    r = perplexity(FixedLogits([0.0] * 5), IDS, seq_len=4)
    assert r["windows"] == 2 and r["tokens"] == 6
    assert r["nll"] == pytest.approx(math.log(5), rel=1e-6)  # fp32 log_softmax
    assert r["ppl"] == pytest.approx(5.0, rel=1e-6)


def test_hand_computed_nll():
    # logits [2, 0, 0, 0]: p(0) = e^2 / (e^2 + 3), p(other) = 1 / (e^2 + 3).
    z = math.exp(2) + 3
    nll0, nll_other = -(2 - math.log(z)), math.log(z)
    # windows [3 0 1 0] and [2 0 0 3]; scored (positions 1..3): 0 1 0 | 0 0 3 -> four 0s, two others.
    expected = (4 * nll0 + 2 * nll_other) / 6
    r = perplexity(FixedLogits([2.0, 0.0, 0.0, 0.0]), IDS, seq_len=4)
    assert r["nll"] == pytest.approx(expected, rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert r["tokens"] == 6

    # max_windows=1: only [3 0 1 0] -> scored 0 1 0.
    r1 = perplexity(FixedLogits([2.0, 0.0, 0.0, 0.0]), IDS, seq_len=4, max_windows=1)
    assert r1["windows"] == 1 and r1["tokens"] == 3
    assert r1["nll"] == pytest.approx((2 * nll0 + nll_other) / 3, rel=1e-6)


def test_windows_are_independent_and_batched():
    stub = FixedLogits([0.0] * 4)
    perplexity(stub, IDS, seq_len=4, batch_size=1)
    assert [c.tolist() for c in stub.calls] == [[[3, 0, 1, 0]], [[2, 0, 0, 3]]]
    stub = FixedLogits([0.0] * 4)
    perplexity(stub, IDS, seq_len=4, batch_size=8)
    assert len(stub.calls) == 1 and stub.calls[0].shape == (2, 4)
    assert scored_tokens(IDS, 4).tolist() == [0, 1, 0, 0, 0, 3]


def test_position_dependent_logits_use_the_preceding_position():
    """Logits at position t must score token t+1: a stub that predicts the next id exactly gives ppl ~ 1."""

    class Oracle(torch.nn.Module):
        def forward(self, input_ids):
            B, T = input_ids.shape
            nxt = torch.roll(input_ids, -1, dims=1)  # the last position's guess is never scored
            return torch.nn.functional.one_hot(nxt, 4).float() * 50.0

    r = perplexity(Oracle(), IDS, seq_len=4)
    assert r["nll"] < 1e-6 and r["ppl"] == pytest.approx(1.0, abs=1e-6)


def test_half_precision_logits_are_scored_in_fp32():
    row = [1.5, -0.25, 0.75, 0.0]
    ref = perplexity(FixedLogits(torch.tensor(row).bfloat16().float().tolist()), IDS, seq_len=5)
    r = perplexity(FixedLogits(row, dtype=torch.bfloat16), IDS, seq_len=5)
    assert r["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert r["windows"] == 2 and r["tokens"] == 8


def test_unigram_hand_computed():
    counts = torch.tensor([3, 1, 0, 0])  # N = 4, V = 4: p = 4/8, 2/8, 1/8, 1/8
    logp = {0: math.log(4 / 8), 1: math.log(2 / 8), 2: math.log(1 / 8), 3: math.log(1 / 8)}
    u = unigram_perplexity(counts, IDS, seq_len=4)  # scores 0 1 0 | 0 0 3
    expected = -(4 * logp[0] + logp[1] + logp[3]) / 6
    assert u["nll"] == pytest.approx(expected, rel=1e-12)
    assert u["ppl"] == pytest.approx(math.exp(expected), rel=1e-12)
    assert u["tokens"] == 6 and u["windows"] == 2
    # The same counts as a mapping; and every token scored without seq_len.
    assert unigram_perplexity({0: 3, 1: 1}, IDS, seq_len=4, vocab_size=4)["nll"] == pytest.approx(expected, rel=1e-12)
    everything = -sum(logp[int(t)] for t in IDS) / len(IDS)
    assert unigram_perplexity(counts, IDS)["nll"] == pytest.approx(everything, rel=1e-12)


def test_unigram_matches_a_model_that_predicts_the_unigram():
    counts = torch.tensor([5, 2, 2, 1])
    p = (counts + 1) / (counts.sum() + 4)
    m = perplexity(FixedLogits(p.log().tolist()), IDS, seq_len=4)
    u = unigram_perplexity(counts, IDS, seq_len=4)
    assert m["ppl"] == pytest.approx(u["ppl"], rel=1e-6)
    assert (m["windows"], m["tokens"]) == (u["windows"], u["tokens"])


def test_bad_inputs():
    stub = FixedLogits([0.0] * 4)
    with pytest.raises(ValueError):
        perplexity(stub, IDS, seq_len=11)  # no full window
    with pytest.raises(ValueError):
        perplexity(stub, IDS, seq_len=1)
    with pytest.raises(ValueError):
        perplexity(stub, IDS.view(2, 5), seq_len=4)
    with pytest.raises(ValueError):
        unigram_perplexity(torch.tensor([1, 1]), IDS)  # ids beyond the count table

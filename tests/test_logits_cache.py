"""The reference runs once per window in `qwen2q eval`: its logits are replayed, exactly, from memory or disk."""
import pytest
import torch

from conftest import make_hf_checkpoint
from qwen2q.evals import harness
from qwen2q.evals.data import EvalText
from qwen2q.evals.logits_cache import CachedLogits
from qwen2q.qconfig import QuantConfig
from qwen2q.quantization import quantize


class Counting:
    """A stand-in model: logits from a fixed random projection of the ids, counting its calls."""

    def __init__(self, vocab=50, dtype=torch.bfloat16):
        self.table, self.calls = torch.randn(1000, vocab, generator=torch.Generator().manual_seed(0)).to(dtype), 0

    def parameters(self):
        return iter([self.table])

    def __call__(self, ids):
        self.calls += 1
        return self.table[ids]


@pytest.mark.parametrize("memory, margin, kept", [(2**30, 0, "memory"), (0, 0, "disk"), (0, 2**62, "none")])
def test_replays_are_exact_and_bounded(memory, margin, kept):
    model = Counting()
    windows = [torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with CachedLogits(model, memory_bytes=memory, disk_margin_bytes=margin) as cache:
        first = [cache(w) for w in windows]
        again = [cache(w) for w in windows]
        folder = cache._folder
    for a, b in zip(first, again):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    assert model.calls == (6 if kept == "none" else 3)
    assert cache.replays == (0 if kept == "none" else 3)
    if folder is not None:
        assert not folder.exists()  # its temporary folder is gone after close


def test_eval_runs_the_reference_once_per_window_and_agrees_with_no_cache(tmp_path, monkeypatch):
    make_hf_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, seed=7)
    for method in ("nf4", "int8"):
        quantize(tmp_path / "bf16", tmp_path / method, QuantConfig(method), progress=False)
    text = EvalText(" ".join(f"token{i % 97} and more {i}" for i in range(3000)), "words", "test")
    calls = {}
    real_call = harness.FiniteLogits.__call__

    def counted(self, ids):
        calls[self.path] = calls.get(self.path, 0) + 1
        return real_call(self, ids)

    monkeypatch.setattr(harness.FiniteLogits, "__call__", counted)
    run = lambda: harness.evaluate([tmp_path / "nf4", tmp_path / "int8"], text, reference=tmp_path / "bf16",  # noqa: E731
                                   seq_len=64, max_windows=5, progress=False)
    cached = run()
    assert calls[tmp_path / "bf16"] == 5 and calls[tmp_path / "nf4"] == 5 and calls[tmp_path / "int8"] == 5
    monkeypatch.setattr(harness, "CachedLogits", lambda m: CachedLogits(m, memory_bytes=0, disk_margin_bytes=2**62))
    calls.clear()
    uncached = run()
    assert calls[tmp_path / "bf16"] == 15  # what every run cost before: once alone, once per candidate
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(cached["rows"]) == strip(uncached["rows"])

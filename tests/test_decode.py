"""The fixed-shape decode path (what CUDA graphs capture) gives the ordinary path's logits."""
import pytest
import torch

from qwen2q.decode import StaticDecoder
from qwen2q.loader import load_model


@pytest.mark.parametrize("window", [None, 8])
def test_static_steps_equal_dynamic_decoding(tmp_path, window):
    from conftest import make_hf_checkpoint

    extra = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1) if window else {}
    make_hf_checkpoint(tmp_path, **extra)
    model = load_model(tmp_path, dtype="float32")
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)[0]
    dec = StaticDecoder(model, max_len=48, use_graph=False)
    got = [dec.prefill(ids[:, :20])[0]]
    for t in range(20, 40):
        got.append(dec.step(ids[:, t : t + 1])[0])
    assert (torch.stack(got[:-1]) - full[19:39]).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, 8, use_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager(tmp_path):
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(tmp_path)
    model = load_model(tmp_path, device="cuda", dtype="float32")
    ids = torch.randint(0, 320, (1, 24), device="cuda")
    eager, graphed = StaticDecoder(model, 32, use_graph=False), StaticDecoder(model, 32, use_graph=True)
    eager.prefill(ids[:, :8]), graphed.prefill(ids[:, :8])
    for t in range(8, 24):
        a, b = eager.step(ids[:, t : t + 1]), graphed.step(ids[:, t : t + 1])
        assert (a - b).abs().max().item() <= 1e-4


def test_a_step_that_cannot_be_captured_decodes_on_without_the_graph(tmp_path, monkeypatch):
    """If capturing fails (an op CUDA graphs refuse), the decoder warns once and steps eagerly with the same
    logits.  Simulated on the CPU: capture is made to raise as torch.cuda.graph does."""
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(tmp_path)
    model = load_model(tmp_path, dtype="float32")
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    eager, failing = StaticDecoder(model, 16, use_graph=False), StaticDecoder(model, 16, use_graph=False)
    failing.use_graph = True

    def refuse():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(failing, "_capture", refuse)
    eager.prefill(ids[:, :6]), failing.prefill(ids[:, :6])
    with pytest.warns(RuntimeWarning, match="decoding without a CUDA graph: capturing the decode step failed"):
        b = failing.step(ids[:, 6:7])
    assert torch.equal(eager.step(ids[:, 6:7]), b) and not failing.use_graph
    for t in range(7, 12):
        assert torch.equal(eager.step(ids[:, t : t + 1]), failing.step(ids[:, t : t + 1]))

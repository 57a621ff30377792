"""Sampling filters against direct float64 computations, stop tokens, streaming and the load() API."""
import pytest
import torch

import qwen2q
from qwen2q.errors import Qwen2qError
from qwen2q.generation import SamplingParams, TextStream, generate_ids, next_token


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    seen = {int(next_token(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert seen == {1, 3}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    logits = probs.log().float()
    g = torch.Generator().manual_seed(0)
    # 0.5 < 0.7 so the second token is needed; 0.5 + 0.3 >= 0.7 so the third is not.
    seen = {int(next_token(logits, SamplingParams(temperature=1.0, top_p=0.7), g)) for _ in range(300)}
    assert seen == {0, 1}


def test_sampling_frequencies_follow_temperature():
    logits = torch.tensor([[1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_token(logits, SamplingParams(temperature=0.5), g) for _ in range(4000)])
    expected = 1 / (1 + torch.exp(torch.tensor(-2.0, dtype=torch.float64)))  # softmax([2, 0])[0]
    assert abs((draws == 0).double().mean() - expected) < 0.03


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(hf_tiny):
    from qwen2q.loader import load_model

    model = load_model(hf_tiny[0])
    prompt = [3, 4, 5]
    a = generate_ids(model, prompt, SamplingParams(20, temperature=1.0, seed=7))
    b = generate_ids(model, prompt, SamplingParams(20, temperature=1.0, seed=7))
    assert a == b
    greedy = generate_ids(model, prompt, SamplingParams(20))
    assert generate_ids(model, prompt, SamplingParams(20, temperature=1.0, top_k=1, seed=3)) == greedy


def test_stops_at_first_stop_token(hf_tiny):
    from qwen2q.loader import load_model

    model = load_model(hf_tiny[0])
    free = generate_ids(model, [3, 4, 5], SamplingParams(30))
    stop = free[10]
    first = free.index(stop)
    assert generate_ids(model, [3, 4, 5], SamplingParams(30), stop_ids=[stop]) == free[: first + 1]


def test_text_stream_holds_back_partial_utf8():
    pieces = []
    ids_to_bytes = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}
    stream = TextStream(lambda ids: b"".join(ids_to_bytes[i] for i in ids).decode("utf-8", "replace"), pieces.append)
    for i in (1, 2, 3):
        stream(i)
    assert pieces == ["caf", "é!"]


def test_load_api_generate_and_chat(hf_tiny, capsys):
    m = qwen2q.load(hf_tiny[0], dtype="float32")
    text = m.generate("The quick", max_new_tokens=8, stream=True)
    assert capsys.readouterr().out == text
    ids = m.generate_ids("The quick", max_new_tokens=8)
    assert m.tokenizer.decode(ids, skip_special_tokens=True) == text
    reply = m.chat([{"role": "user", "content": "hi"}], max_new_tokens=5)
    assert isinstance(reply, str)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=-1)])
def test_invalid_sampling_parameters(bad):
    with pytest.raises(Qwen2qError):
        SamplingParams(**bad)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_api_and_the_command_share_sampling_defaults(command):
    import inspect

    from qwen2q.api import QwenModel
    from qwen2q.cli import main

    api = inspect.signature(QwenModel.generate).parameters
    cli = {p.name: p.default for p in main.commands[command].params}
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        assert api[name].default == cli[name] == getattr(SamplingParams(), name), name


def test_on_token_sees_each_new_id_and_text_stream_writes_the_text(hf_tiny, capsys):
    m = qwen2q.load(hf_tiny[0], dtype="float32")
    ids = m.generate_ids("The quick", max_new_tokens=8)
    seen = []
    text = m.generate("The quick", max_new_tokens=8, stream=True, on_token=seen.append)
    assert seen == ids and capsys.readouterr().out == text
    pieces = []
    stream = m.text_stream(pieces.append)
    assert m.generate("The quick", max_new_tokens=8, on_token=stream) == "".join(pieces) == text
    assert stream.ids == ids and capsys.readouterr().out == ""


@pytest.mark.parametrize("params", [SamplingParams(24), SamplingParams(24, temperature=0.8, top_p=0.9, seed=5)],
                         ids=["greedy", "sampled"])
def test_the_static_step_generates_the_ordinary_paths_tokens(hf_tiny, params):
    """The fixed-shape step (a CUDA graph on CUDA, where generate uses it by default; eager here) continues the
    prompt with the same tokens as the ordinary path, and stops at the same stop token."""
    from qwen2q.loader import load_model

    model = load_model(hf_tiny[0], dtype="float32")
    prompt = [3, 4, 5, 6, 7]
    ordinary = generate_ids(model, prompt, params, static=False)
    assert generate_ids(model, prompt, params, static=True) == ordinary
    stop = ordinary[12]
    assert generate_ids(model, prompt, params, stop_ids=[stop], static=True) == ordinary[: ordinary.index(stop) + 1]

"""Ordinary mistakes at run time end in one `error:` line (CLI) or a Qwen2qError subclass (API), never a traceback:
bad devices and dtypes, chat templates that fail, malformed messages, bad token ids, bench settings."""
import shutil

import pytest
import torch

import qwen2q
from cli_support import one_line_error, run_cli, tree_digest
from conftest import make_hf_checkpoint
from qwen2q.devices import DeviceError, parse_device
from qwen2q.errors import Qwen2qError
from qwen2q.generation import TokenIdError
from qwen2q.tokenizer import MessagesError, TemplateRenderError

CPU_ONLY = not torch.backends.cuda.is_built()
cpu_only = pytest.mark.skipif(not CPU_ONLY, reason="asserts the message of a torch build without CUDA")

BAD_TEMPLATES = {
    "huge_range": ("{% for i in range(10**9) %}x{% endfor %}", "OverflowError"),
    "zero_division": ("{{ messages[0]['content'] }}{{ 1 // 0 }}", "ZeroDivisionError"),
    "syntax": ("{% for message in messages %}", "Unexpected end of template"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(root, tie_word_embeddings=True)
    return root


@pytest.fixture(scope="module")
def bad_template(tiny, tmp_path_factory):
    """name -> a copy of `tiny` whose chat_template.jinja is BAD_TEMPLATES[name]."""
    out = {}
    for name, (template, _) in BAD_TEMPLATES.items():
        path = tmp_path_factory.mktemp(name)
        shutil.copytree(tiny, path, dirs_exist_ok=True)
        (path / "chat_template.jinja").write_text(template)
        out[name] = path
    return out


# --- devices ------------------------------------------------------------------------------------

@cpu_only
def test_readme_bench_on_cuda_is_one_line_on_a_cpu_build():
    one_line_error(run_cli("bench", "--device", "cuda"), "device 'cuda'", "no CUDA support")


@pytest.mark.parametrize("args, needle", [
    (["generate", "-p", "hi", "--device", "tpu7"], "device 'tpu7' is not a device; use cpu, cuda or cuda:N"),
    (["chat", "--device", "xla"], "type 'xla' is not supported"),
    (["eval", "--device", "cuda:7", "--max-windows", "1"], "device 'cuda:7'"),
    (["generate", "-p", "hi", "--dtype", "float8"], "dtype 'float8' is not supported"),
])
def test_bad_device_or_dtype_is_one_line(args, needle):
    one_line_error(run_cli(*args, stdin=""), needle)


def test_quantize_bad_device_writes_nothing(tmp_path):
    before = tree_digest(tmp_path)
    one_line_error(run_cli("quantize", tmp_path / "out", "-m", "awq", "--device", "cuda:7"), "device 'cuda:7'")
    assert tree_digest(tmp_path) == before


def test_parse_device_accepts_cpu_and_refuses_the_rest():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match="'tpu7' is not a device"):
        parse_device("tpu7")
    with pytest.raises(DeviceError, match="type 'meta' is not supported"):
        parse_device("meta")
    with pytest.raises(DeviceError, match="must be a string"):
        parse_device(0)


def test_parse_device_cuda_cases(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(DeviceError, match="this torch build .* has no CUDA support"):
        parse_device("cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="'cuda': no CUDA device is available"):
        parse_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda") == torch.device("cuda")
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"'cuda:2': there are only 2 CUDA devices \(cuda:0 .. cuda:1\)"):
        parse_device("cuda:2")


@cpu_only
def test_load_on_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="device 'cuda': this torch build .* has no CUDA support"):
        qwen2q.load(device="cuda")


def test_load_with_a_non_dtype():
    with pytest.raises(Qwen2qError, match="dtype must be a string"):
        qwen2q.load(dtype=16)


# --- prompts and token ids ----------------------------------------------------------------------

def test_empty_prompt_is_one_line():
    one_line_error(run_cli("generate", "-p", ""), "the prompt is empty")


@pytest.mark.parametrize("prompt, needle", [
    ([5, 320], "token id 1 is 320, outside the vocabulary [0, 320)"),
    ([-1, 5], "token id 0 is -1, outside the vocabulary [0, 320)"),
    ([5, 1.5], "token id 1 is not an integer: 1.5"),
    ([True], "token id 0 is not an integer: True"),
    (7, "the prompt must be text or a list of token ids, got int"),
    (None, "the prompt must be text or a list of token ids, got NoneType"),
])
def test_generate_refuses_bad_token_ids(tiny, prompt, needle):
    m = qwen2q.load(tiny)
    with pytest.raises(TokenIdError) as e:
        m.generate(prompt, max_new_tokens=2)
    assert needle in str(e.value)


def test_generate_accepts_integer_tensors_and_numpy_ids(tiny):
    import numpy as np

    m = qwen2q.load(tiny)
    want = m.generate_ids([3, 4, 5], max_new_tokens=3)
    assert m.generate_ids(torch.tensor([3, 4, 5]), max_new_tokens=3) == want
    assert m.generate_ids(np.array([3, 4, 5]), max_new_tokens=3) == want


# --- chat messages and templates ----------------------------------------------------------------

@pytest.mark.parametrize("messages, needle", [
    ("hi", "messages must be a list of dicts, got str"),
    ({"role": "user", "content": "hi"}, "messages must be a list of dicts, got dict"),
    ([("user", "hi")], "message 0 must be a dict with 'role' and 'content'"),
    ([{"role": "user", "content": 5}], "message 0: content must be a string, got int 5"),
    ([{"role": "user", "content": "a"}, {"role": None, "content": "b"}], "message 1: role must be a string"),
])
def test_chat_refuses_malformed_messages(tiny, messages, needle):
    m = qwen2q.load(tiny)
    with pytest.raises(MessagesError) as e:
        m.chat(messages, max_new_tokens=2)
    assert needle in str(e.value)


@pytest.mark.parametrize("name", list(BAD_TEMPLATES))
def test_failing_template_is_a_template_error(bad_template, name):
    m = qwen2q.load(bad_template[name])
    with pytest.raises(TemplateRenderError, match=f"chat template failed: .*{BAD_TEMPLATES[name][1]}"):
        m.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)


@pytest.mark.parametrize("name", ["huge_range", "zero_division"])
def test_failing_template_is_one_line_in_the_cli(bad_template, name):
    one_line_error(run_cli("generate", bad_template[name], "--chat", "-p", "hi"),
                   "chat template failed", BAD_TEMPLATES[name][1])


def test_failing_template_in_chat_is_one_line(bad_template):
    one_line_error(run_cli("chat", bad_template["huge_range"], stdin="hi\n"), "chat template failed: OverflowError")


# --- bench --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--graph"], "--graph (CUDA graphs) needs a CUDA device, not cpu"),
    (["--prompt-len", "500", "--new-tokens", "20"], "--prompt-len 500 + --new-tokens 20 exceed the model's context of 512"),
])
def test_bench_settings_are_one_line(args, needle):
    one_line_error(run_cli("bench", *args), needle)

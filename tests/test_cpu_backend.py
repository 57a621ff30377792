"""Quantized models loaded on CPU run the CPU backend (qwen2q.kernels.cpu), prepared at load time, and give the
reference path's logits (QWEN2Q_KERNELS=reference) within the backend's tolerance; `cpu_cache="bf16"` gives
them exactly."""
import json

import pytest
import torch

import qwen2q
from conftest import make_hf_checkpoint
from qwen2q import kernels
from qwen2q.errors import Qwen2qError
from qwen2q.kernels import cpu
from qwen2q.loader import check_cpu_cache
from qwen2q.qconfig import QuantConfig
from qwen2q.qlinear import QuantLinear, forced_backend, prepare_kernels

METHODS = {"int4": cpu.Int4Prepared, "int8": cpu.Int8Prepared, "nf4": cpu.NF4Prepared,
           "ct-int4": cpu.Int4Prepared, "ct-int8": cpu.Int8Prepared}  # ct-: compressed-tensors layout
CONFIGS = {"int4": QuantConfig("int4", group_size=64), "int8": QuantConfig("int8"), "nf4": QuantConfig("nf4"),
           "ct-int4": QuantConfig("int4", group_size=64, layout="compressed-tensors"),  # asymmetric W4A16
           "ct-int8": QuantConfig("int8", layout="compressed-tensors")}  # W8A16, one scale per row


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{method: quantized tiny checkpoint} (hidden 128, k/v 64 outputs: every projection the backend takes)."""
    src = tmp_path_factory.mktemp("src")
    make_hf_checkpoint(src, dtype=torch.bfloat16, tie_word_embeddings=True)
    out = {}
    for method in METHODS:
        dst = tmp_path_factory.mktemp(method) / "q"
        qwen2q.quantize(src, dst, CONFIGS[method], progress=False)
        out[method] = dst
    return out


def linears(m) -> list[QuantLinear]:
    return [mod for mod in m.model.modules() if isinstance(mod, QuantLinear)]


def reference_logits(m, ids):
    with forced_backend(m.model, "reference"):
        return m.model(ids)


def prompt(n: int) -> torch.Tensor:
    return torch.randint(0, 320, (1, n), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("method", METHODS)
def test_loading_on_cpu_prepares_every_linear(checkpoints, method):
    m = qwen2q.load(checkpoints[method], dtype="bfloat16")
    mods = linears(m)
    assert mods and all(isinstance(mod.prepared, METHODS[method]) for mod in mods)
    workspaces = {id(mod.prepared.workspace) for mod in mods}
    assert len(workspaces) == 1  # one scratch workspace per model
    for mod in mods:  # buffers sit on 64-byte boundaries (safetensors hands them over 8 bytes off one)
        assert all(t.data_ptr() % cpu.ALIGNMENT == 0 for t in mod.buffers())
    if method == "int8":  # the backend runs the module's own int8 tensor: no second copy
        assert all(mod.prepared.qweight.data_ptr() == mod.qweight.data_ptr() for mod in mods)
    assert all(mod.prepared is None for mod in linears(qwen2q.load(checkpoints[method], dtype="float32")))


@pytest.mark.parametrize("method", METHODS)
# one decode row (every format's kernel), a short prefill (int4 and int8 dequantize + GEMM, NF4's kernel), a long one
@pytest.mark.parametrize("tokens", [1, 40, cpu.NF4_KERNEL_ROWS + 1])
def test_logits_track_the_reference_path(checkpoints, method, tokens, monkeypatch):
    m = qwen2q.load(checkpoints[method], dtype="bfloat16")
    ids = prompt(tokens)
    with torch.inference_mode():
        ref = reference_logits(m, ids).float()
        got = m.model(ids).float()
    kernel_rows = {"nf4": cpu.NF4_KERNEL_ROWS, "int8": cpu.INT8_KERNEL_ROWS, "ct-int8": cpu.INT8_KERNEL_ROWS}
    if method in kernel_rows and tokens > kernel_rows[method]:
        assert torch.equal(got, ref)  # the same bf16 W and the same GEMM
    else:
        assert (got - ref).norm() / ref.norm() < 0.02
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_bf16_cache_gives_the_reference_logits_and_tokens(checkpoints, method, monkeypatch):
    m = qwen2q.load(checkpoints[method], dtype="bfloat16", cpu_cache="bf16")
    assert all(isinstance(mod.prepared, cpu.DensePrepared) for mod in linears(m))
    ids = prompt(12)
    with torch.inference_mode():
        assert torch.equal(m.model(ids), reference_logits(m, ids))
    tokens = m.generate_ids(ids[0].tolist(), max_new_tokens=6)
    with forced_backend(m.model, "reference"):
        assert m.generate_ids(ids[0].tolist(), max_new_tokens=6) == tokens


def test_the_backend_is_chosen_at_load_not_read_from_the_environment_on_every_call(checkpoints, monkeypatch):
    """QWEN2Q_KERNELS is read when a model is loaded: set afterwards (even to a value it would refuse) it changes
    nothing; a model loaded under it takes the reference."""
    m = qwen2q.load(checkpoints["int8"], dtype="bfloat16")
    assert {mod.kind for mod in linears(m)} == {"cpu"}
    ids = prompt(5)
    with torch.inference_mode():
        before = m.model(ids)
        monkeypatch.setenv(kernels.ENV, "fast")
        assert torch.equal(m.model(ids), before)
        monkeypatch.setenv(kernels.ENV, "reference")
        ref = qwen2q.load(checkpoints["int8"], dtype="bfloat16")
        assert {mod.kind for mod in linears(ref)} == {"reference"}
        assert torch.equal(ref.model(ids), reference_logits(m, ids))


def test_moving_a_linear_drops_its_prepared_weight(checkpoints):
    m = qwen2q.load(checkpoints["int4"], dtype="bfloat16")
    mods = linears(m)
    m.model.to("cpu")  # already there: the buffers stay, and so does the prepared weight
    assert all(mod.prepared is not None for mod in mods)
    mods[0].to("meta")
    assert mods[0].prepared is None and all(mod.prepared is not None for mod in mods[1:])
    mods[1].to_empty(device="cpu")
    assert mods[1].prepared is None
    prepare_kernels(mods[1:])
    assert isinstance(mods[1].prepared, cpu.Int4Prepared)


def test_cpu_cache_values_that_would_be_ignored_are_refused(checkpoints):
    with pytest.raises(Qwen2qError, match="cpu_cache='fp8' is not known; use None or one of bf16"):
        qwen2q.load(checkpoints["nf4"], cpu_cache="fp8")
    with pytest.raises(Qwen2qError, match="cpu_cache='bf16' needs the model in bfloat16, not float32"):
        qwen2q.load(checkpoints["nf4"], dtype="float32", cpu_cache="bf16")
    with pytest.raises(Qwen2qError, match="cpu_cache='bf16' applies to models loaded on CPU, not on cuda"):
        check_cpu_cache("bf16", torch.device("cuda"), torch.bfloat16)


def test_cli_takes_cpu_cache_where_models_are_loaded(checkpoints, tmp_path):
    from cli_support import run_cli

    r = run_cli("generate", checkpoints["nf4"], "-p", "The quick", "--max-new-tokens", "4", "--cpu-cache", "bf16")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "e.json"
    r = run_cli("eval", checkpoints["nf4"], "--seq-len", "16", "--max-windows", "2", "--cpu-cache", "bf16",
                "--json", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["settings"]["cpu_cache"] == "bf16"
    assert "--cpu-cache [none|bf16]" in run_cli("bench", "--help").stdout


def test_cli_refuses_a_cpu_cache_it_would_ignore(checkpoints):
    from cli_support import one_line_error, run_cli

    one_line_error(run_cli("generate", checkpoints["nf4"], "-p", "x", "--dtype", "float32", "--cpu-cache", "bf16"),
                   "cpu_cache='bf16' needs the model in bfloat16, not float32")
    r = run_cli("chat", checkpoints["nf4"], "--cpu-cache", "fp8", stdin="")
    assert r.returncode == 2 and "error: Invalid value for '--cpu-cache'" in r.stderr

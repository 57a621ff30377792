"""A quantized linear that holds its weight's kernel form in place of the checkpoint's tensors (an int4 weight on
CUDA: the GEMV layout, `kernels.replaces`) keeps its bytes once, computes what the AWQ tensors compute, and gives
those tensors back bit for bit to `state_dict`, `weight_q`, a move and `load_state_dict`.

Without a GPU, `kernels.prepare` is made to return what it returns on CUDA (`int4_native.from_awq`) for CPU
tensors; the module then runs the reference path on that form.  With one, the last test runs the real thing."""
import pytest
import torch
import torch.nn.functional as F

from qwen2q import kernels
from qwen2q.kernels import int4_native
from qwen2q.qlinear import module_class
from qwen2q.quantizers import int4, registry

K, N, G = 256, 192, 64


def _awq(device="cpu") -> int4.Int4Weight:
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(N, K, generator=g)
    q = int4.quantize(weight, *int4.compute_scales_zeros(weight, G))
    return int4.Int4Weight(*(t.to(device) for t in (q.qweight, q.qzeros, q.scales)))


def _module(w: int4.Int4Weight, bias: torch.Tensor | None = None):
    fmt = registry.get("awq-gemm")
    m = module_class(fmt)("model.layers.0.mlp.up_proj", K, N, bias is not None, torch.bfloat16, {"group_size": G})
    for name, t in fmt.to_state_dict(w, m.name).items():
        m.load_checkpoint_tensor(name[len(m.name) + 1:], t)
    if bias is not None:
        m.load_checkpoint_tensor("bias", bias)
    m.finish_loading()
    return m


@pytest.fixture
def as_on_cuda(monkeypatch):
    """kernels.prepare returns the int4 GEMV layout for CPU tensors, as it does for CUDA ones."""
    monkeypatch.setattr(kernels, "prepare", lambda fmt, w, *a, **k: int4_native.from_awq(w))


def _x() -> torch.Tensor:
    return torch.randn(3, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def test_the_held_form_replaces_qweight_and_qzeros_and_computes_the_same(as_on_cuda):
    w = _awq()
    bias = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    m = _module(w, bias)
    before = sum(t.numel() * t.element_size() for t in m.buffers())
    m.prepare()
    assert set(m._buffers) == {"scales", "prepared_words", "prepared_zeros"}
    assert m.prepared_words is m.prepared.words and m.prepared.scales is m.scales
    after = sum(t.numel() * t.element_size() for t in m.buffers())
    # qzeros packs 8 zeros a word, the layout keeps one byte each: + K/G * N / 2 bytes, nothing else
    assert after - before == K // G * N // 2
    expected = F.linear(_x(), int4.dequantize(w, torch.bfloat16), bias)
    assert torch.equal(m(_x()), expected)
    m.prepare()  # again: still one copy, the same numbers
    assert set(m._buffers) == {"scales", "prepared_words", "prepared_zeros"}
    assert torch.equal(m(_x()), expected)


def test_state_dict_and_weight_q_give_the_awq_tensors_back(as_on_cuda):
    w = _awq()
    m = _module(w)
    keys = list(m.state_dict())
    m.prepare()
    state = m.state_dict()
    assert sorted(state) == sorted(keys) == ["qweight", "qzeros", "scales"]
    for name in keys:
        assert torch.equal(state[name], getattr(w, name)), name
    assert all(torch.equal(getattr(m.weight_q(), f), getattr(w, f)) for f in ("qweight", "qzeros", "scales"))


def test_a_move_gives_the_module_its_awq_tensors_back(as_on_cuda):
    """`.to(device)` goes through `_apply`; a copying function stands in for a move between devices."""
    w = _awq()
    m = _module(w)
    m.prepare()
    m._apply(lambda t: t.clone())
    assert set(m._buffers) == {"qweight", "qzeros", "scales"} and m.prepared is None and m.kind is None
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(m, name), getattr(w, name)), name
    assert torch.equal(m(_x()), F.linear(_x(), int4.dequantize(w, torch.bfloat16)))


def test_a_move_whose_rebuild_fails_leaves_the_module_whole(as_on_cuda, monkeypatch):
    """If rebuilding the AWQ tensors fails after the buffers moved (out of memory where they went), the module still
    holds the moved form and computes with it; nothing points back at the old tensors."""
    w = _awq()
    m = _module(w)
    m.prepare()

    def fail(prepared):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(kernels, "restore", fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            m._apply(lambda t: t.clone())
    assert m.prepared.words is m.prepared_words and m.prepared.scales is m.scales
    assert torch.equal(m(_x()), F.linear(_x(), int4.dequantize(w, torch.bfloat16)))
    assert torch.equal(m.state_dict()["qweight"], w.qweight)


def test_loading_a_state_dict_into_a_held_module(as_on_cuda):
    w, other = _awq(), _module(_awq()).state_dict()
    other["qweight"] = torch.flip(other["qweight"], dims=[0])
    m = _module(w)
    m.prepare()
    m.load_state_dict(other)
    assert m.prepared is None and torch.equal(m.qweight, other["qweight"])
    assert torch.equal(m(_x()), F.linear(_x(), int4.dequantize(m.weight_q(), torch.bfloat16)))


def test_cpu_forms_hold_nothing_in_place_of_the_weight():
    m = _module(_awq())
    m.prepare()
    assert m.prepared is not None and kernels.replaces(m.prepared) == ()
    assert {"qweight", "qzeros", "scales"} <= set(m._buffers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_module_holds_one_copy_and_matches_the_reference():
    w = _awq("cuda")
    m = _module(w)
    m.prepare()
    assert "qweight" not in m._buffers and m.prepared_words.is_cuda
    x = _x().cuda()
    ref = F.linear(x.double(), int4.dequantize(w, torch.float64))
    u = 2.0**-8  # bf16's unit roundoff; the kernel tests' bound: 2u |ref| + 4u rms(ref) elementwise
    for rows in (1, 16, 300, 600):  # the GEMV, int4_decode (mma.sync, wgmma), int4_prefill
        xr, expected = x.repeat(rows // 3 + 1, 1)[:rows], ref.repeat(rows // 3 + 1, 1)[:rows]
        bound = 2 * u * expected.abs() + 4 * u * expected.pow(2).mean().sqrt()
        assert ((m(xr).double() - expected).abs() <= bound).all(), rows
    m.cpu()
    assert torch.equal(m.qweight, w.qweight.cpu())

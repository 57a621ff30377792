"""int4 linears of one input grouped into one launch (`qwen2q.fused.FusedProjections`): the same outputs as the
linears alone, one copy of the words (each linear holds a view of the concatenation), the checkpoint's tensors back
from `state_dict`, and the group dropped (the linears alone again) when a linear is moved or loaded anew.

Without a GPU, `kernels.prepare` is made to return the GEMV layout for CPU tensors, as it does on CUDA; the linears
then run the reference path on it, or with `kind` forced to "triton" the kernels under the interpreter."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch
from torch import nn

from qwen2q import fused, kernels
from qwen2q.kernels import int4_native
from qwen2q.model import Projections
from qwen2q.qlinear import module_class
from qwen2q.quantizers import int4, registry

K, G = 256, 64
SIZES = {"q_proj": 256, "k_proj": 64, "v_proj": 64}


def _linear(name: str, N: int, seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=g)
    w = int4.quantize(weight, *int4.compute_scales_zeros(weight, G))
    fmt = registry.get("awq-gemm")
    m = module_class(fmt)(f"model.layers.0.self_attn.{name}", K, N, bias, torch.bfloat16, {"group_size": G})
    for key, t in fmt.to_state_dict(w, m.name).items():
        m.load_checkpoint_tensor(key[len(m.name) + 1:], t.to(kt.DEVICE))
    if bias:
        m.load_checkpoint_tensor("bias", torch.randn(N, generator=g).to(kt.DEVICE))
    m.finish_loading()
    return m


class _Attention(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        for i, (name, N) in enumerate(SIZES.items()):
            setattr(self, name, _linear(name, N, i, bias and name != "v_proj"))  # v without a bias: zeros there
        self.project = Projections(*SIZES)

    def forward(self, x):
        return self.project(x, self.q_proj, self.k_proj, self.v_proj)


@pytest.fixture
def as_on_cuda(monkeypatch):
    """kernels.prepare returns the int4 GEMV layout for CPU tensors, as it does for CUDA ones, and the fused modules
    take CPU tensors."""
    monkeypatch.setattr(kernels, "prepare", lambda fmt, w, *a, **k: int4_native.from_awq(w))
    monkeypatch.setattr(fused, "_kernels_take", lambda t, *p: t.dtype in (torch.bfloat16, torch.float16))


def _prepared_attention(kind: str | None = None) -> _Attention:
    a = _Attention()
    for name in SIZES:
        getattr(a, name).prepare()
        if kind:
            getattr(a, name).kind = kind
    return a


def _x(M: int) -> torch.Tensor:
    return torch.randn(1, M, K, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16).to(kt.DEVICE)


def _close(got: tuple, ref: tuple):
    """Within one bf16 rounding: the grouped call sums each output in its own order (another split or tile)."""
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert ((a.float() - b.float()).abs() <= 2.0**-7 * b.float().abs() + 1e-2).all()


@pytest.mark.parametrize("kind", [None, "triton"])
@pytest.mark.parametrize("M", [1, 5, 600])  # the GEMV, int4_decode, dequantize + cuBLAS (past MAX_M)
def test_the_group_gives_the_linears_outputs(as_on_cuda, monkeypatch, kind, M):
    if kind is None and not kt.INTERPRET:
        pytest.skip("on a GPU the linears take the kernels themselves")
    if M == 600 and kt.INTERPRET and kind == "triton":
        pytest.skip("the dequantize kernel is tested in test_int4_prefill; 600 rows of GEMM in numpy are slow")
    a = _prepared_attention(kind)
    x = _x(M)
    alone = a(x)
    assert fused.use_fused_ops(a) == 1 and isinstance(a.project, fused.FusedProjections)
    calls = []
    linear = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda fmt, x, w, bias, prepared, kind: calls.append(
        prepared.out_features) or linear(fmt, x, w, bias, prepared, kind))
    grouped = a(x)
    assert calls == [sum(SIZES.values())]  # one call, on the concatenation
    _close(grouped, alone)


def test_the_words_are_held_once(as_on_cuda):
    a = _prepared_attention()
    before = sum(getattr(a, n).prepared_words.untyped_storage().nbytes() for n in SIZES)
    fused.use_fused_ops(a)
    storage = a.project._group.native.words.untyped_storage()
    assert storage.nbytes() == before
    assert all(getattr(a, n).prepared_words.untyped_storage().data_ptr() == storage.data_ptr() for n in SIZES)


def test_state_dict_is_the_checkpoints(as_on_cuda):
    a = _prepared_attention()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    fused.use_fused_ops(a)
    after = a.state_dict()
    assert sorted(after) == sorted(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_a_linear_loaded_anew_leaves_the_group(as_on_cuda):
    """load_state_dict gives k_proj other weights: the group must not answer with the old ones."""
    a = _prepared_attention()
    fused.use_fused_ops(a)
    other = _linear("k_proj", SIZES["k_proj"], seed=99, bias=True)
    a.k_proj.load_state_dict(other.state_dict())
    x = _x(3)
    q, k, v = a(x)
    assert a.project._group is None
    assert torch.equal(k, a.k_proj(x)) and torch.equal(k, other(x))


def test_a_move_drops_the_group(as_on_cuda):
    a = _prepared_attention()
    fused.use_fused_ops(a)
    a._apply(lambda t: t.clone())  # what .to(another device) does to every tensor
    assert a.project._group is None
    x = _x(2)
    _close(a(x), tuple(getattr(a, n)(x) for n in SIZES))


def test_what_cannot_be_grouped_is_left_alone(as_on_cuda):
    """Plain linears, and int4 linears not prepared (no GEMV layout held): no group, the Projections stays."""
    plain = nn.Module()
    plain.q_proj, plain.k_proj = nn.Linear(K, 8), nn.Linear(K, 8)
    plain.project = Projections("q_proj", "k_proj")
    assert fused.use_fused_ops(plain) == 0 and type(plain.project) is Projections
    unprepared = _Attention()
    assert fused.use_fused_ops(unprepared) == 0 and type(unprepared.project) is Projections

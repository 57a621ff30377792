"""The fused layer kernels (`kernels.layer_ops`) against the PyTorch code they replace (`qwen2q.model`,
`qwen2q.rope`), run on the CPU in the same dtype, and a whole model with them swapped in (`qwen2q.fused`).

The kernels round where PyTorch rounds, so in fp16 and fp32 they must give PyTorch's values (RMSNorm up to its
sum order, silu up to exp's last fp32 bit: one unit of the output at most).  The interpreter truncates fp32 -> bf16
where a GPU rounds to nearest, so bf16 outputs may be one unit off there; on a GPU (TRITON_INTERPRET=0) the same
tests hold them to the fp16 standard."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import pytest
import torch

from qwen2q import fused
from qwen2q.kernels import decode_attention, layer_ops
from qwen2q.model import GatedSiLU, RMSNorm
from qwen2q.rope import QKRotation, RotaryEmbedding
from qwen2q.config import RopeConfig

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _units_apart(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """|got - ref| in units of eps of ref's dtype times `scale` (default |ref|): the magnitude the error of a
    rounding is proportional to (for a sum, its terms')."""
    finfo = torch.finfo(ref.dtype)
    scale = ref.double().abs() if scale is None else scale.double()
    return (got.double() - ref.double()).abs() / (torch.clamp(scale, min=finfo.tiny) * finfo.eps)


def _check(got: torch.Tensor, ref: torch.Tensor, exact: bool, scale: torch.Tensor | None = None):
    """`exact`: the kernel rounds as PyTorch does, so equal in fp16 (and in bf16 on a GPU); otherwise within one
    unit, mostly equal.  fp32 (no final rounding hides a different exp or sum order) and bf16 under the interpreter
    (which truncates: up to two truncations below, each < 2 units) are held to 4 units."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    apart = _units_apart(got, ref, scale)
    if ref.dtype == torch.float32 or (ref.dtype == torch.bfloat16 and kt.INTERPRET):
        assert apart.max() <= 4.0
    elif exact:
        assert torch.equal(got, ref), f"{(got != ref).sum().item()} of {ref.numel()} differ"
    else:
        assert apart.max() <= 2.0 and (got == ref).float().mean() >= 0.95


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 896), (2, 5, 64), (3, 1000)])
def test_rms_norm_matches_the_modules(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(kt.DEVICE)
    delta = torch.randn(shape, generator=g).to(dtype).to(kt.DEVICE)
    norm = RMSNorm(shape[-1], 1e-6).to(dtype).to(kt.DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g).to(kt.DEVICE))
        _check(layer_ops.rms_norm(x, norm.weight, norm.eps), norm(x), exact=False)
        total, normed = layer_ops.rms_norm(x, norm.weight, norm.eps, delta)
        ref_total, ref_normed = norm.add_and_norm(x, delta)
    _check(total, ref_total, exact=True)
    _check(normed, ref_normed, exact=False)


def test_rms_norm_reads_strided_rows_and_writes_only_its_outputs():
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 200, generator=g, dtype=torch.float32).to(kt.DEVICE)
    x = wide[:, 8:136]  # rows 200 apart
    norm = RMSNorm(128, 1e-5).to(kt.DEVICE)
    before = wide.clone()
    with torch.no_grad():
        got = layer_ops.rms_norm(x, norm.weight, norm.eps)
        _check(got, norm(x), exact=False)
    assert torch.equal(wide, before) and got.is_contiguous()


def _rotation_terms(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """|x cos| + |rotate_half(x) sin| for x [B, H, T, D]: the scale of a rotated value's rounding error."""
    c, s = cos.double().abs().unsqueeze(1), sin.double().abs().unsqueeze(1)
    return x.double().abs() * c + x.double().abs().roll(x.shape[-1] // 2, dims=-1) * s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, HQ, HK, D", [(1, 1, 4, 2, 64), (2, 3, 3, 1, 16), (1, 7, 2, 2, 128)])
def test_rotary_qk_matches_the_module(B, T, HQ, HK, D, dtype):
    """q, k as the attention makes them: views [B, H, T, D] of the projections' [B, T, H * D]; cos, sin from
    RotaryEmbedding at positions 5.. (YaRN, so that the scale is not 1)."""
    g = torch.Generator().manual_seed(B * 100 + T)
    q = torch.randn(B, T, HQ * D, generator=g).to(dtype).to(kt.DEVICE).view(B, T, HQ, D).transpose(1, 2)
    k = torch.randn(B, T, HK * D, generator=g).to(dtype).to(kt.DEVICE).view(B, T, HK, D).transpose(1, 2)
    rope = RopeConfig(theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
    positions = torch.arange(5, 5 + T, device=kt.DEVICE).expand(B, T)
    cos, sin = RotaryEmbedding(rope, D).to(kt.DEVICE)(positions, dtype)
    got_q, got_k = layer_ops.rotary_qk(q, k, cos, sin)
    ref_q, ref_k = QKRotation()(q, k, cos, sin)
    for got, ref, x in ((got_q, ref_q, q), (got_k, ref_k, k)):
        _check(got, ref, exact=True, scale=_rotation_terms(x, cos, sin))
    assert got_q.is_contiguous() and got_k.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
def test_rotary_into_the_cache_matches_the_module(T, dtype):
    """The static decode path: q rotated, rotated k and v written at `positions` of a KVCache, nothing else of the
    cache touched (it holds earlier tokens)."""
    from qwen2q.config import Qwen2Config
    from qwen2q.model import KVCache

    config = Qwen2Config(hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=16)
    B, HQ, HK, D = 1, 4, 2, 64
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, HQ * D, generator=g).to(dtype).to(kt.DEVICE).view(B, T, HQ, D).transpose(1, 2)
    k = torch.randn(B, T, HK * D, generator=g).to(dtype).to(kt.DEVICE).view(B, T, HK, D).transpose(1, 2)
    v = torch.randn(B, T, HK * D, generator=g).to(dtype).to(kt.DEVICE).view(B, T, HK, D).transpose(1, 2)
    positions = torch.arange(4, 4 + T, device=kt.DEVICE)
    cos, sin = RotaryEmbedding(RopeConfig(), D).to(kt.DEVICE)(positions.expand(B, T), dtype)
    caches = []
    for _ in range(2):
        cache = KVCache(config, B, 12, dtype, kt.DEVICE)
        for t in (cache.k + cache.v):
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(9)).to(dtype))
        caches.append(cache)
    got_q = layer_ops.rotary_qk_into_cache(q, k, v, cos, sin, caches[0].k[1], caches[0].v[1], positions)
    ref_q, ref_k, ref_v = QKRotation().into_cache(q, k, v, cos, sin, caches[1], 1, positions)
    _check(got_q, ref_q, exact=True, scale=_rotation_terms(q, cos, sin))
    written = torch.zeros(12, dtype=torch.bool, device=kt.DEVICE)
    written[positions] = True
    _check(caches[0].k[1][:, :, written], ref_k[:, :, written], exact=True, scale=_rotation_terms(k, cos, sin))
    assert torch.equal(caches[0].k[1][:, :, ~written], ref_k[:, :, ~written])  # earlier tokens untouched
    assert torch.equal(caches[0].v[1], ref_v) and torch.equal(caches[0].k[0], caches[1].k[0])
    with pytest.raises(ValueError, match="rotary_qk_into_cache"):
        layer_ops.rotary_qk_into_cache(q, k, v, cos, sin, caches[0].k[1], caches[0].v[1], positions.int())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4864), (3, 5, 300)])
def test_silu_mul_matches_the_module(shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).to(kt.DEVICE)
    up = torch.randn(shape, generator=g).to(dtype).to(kt.DEVICE)
    _check(layer_ops.silu_mul(gate, up), GatedSiLU()(gate, up), exact=False)


def test_the_kernels_refuse_what_they_cannot_take():
    z = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=kt.DEVICE)  # noqa: E731
    x = z(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="rms_norm"):
        layer_ops.rms_norm(x, z(32, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="rms_norm"):
        layer_ops.rms_norm(x, z(64, dtype=torch.float16), 1e-6, delta=z(2, 64))
    with pytest.raises(ValueError, match="rotary_qk"):  # D / 2 = 12: not a power of two
        layer_ops.rotary_qk(z(1, 2, 1, 24), z(1, 1, 1, 24), z(1, 1, 24), z(1, 1, 24))
    with pytest.raises(ValueError, match="silu_mul"):
        layer_ops.silu_mul(z(3), z(4))


def test_a_model_with_the_fused_ops_gives_the_plain_models_logits(monkeypatch):
    """The embedded model's shapes at random weights, fp16: `use_fused_ops` swaps 2 norms, a rotation, the cache
    attention and an activation per layer plus the final norm, keeps the state dict, and (with the kernels let run
    on the CPU under the interpreter) prefill and static-path decode logits stay within the fp16 noise of the plain
    model's."""
    from qwen2q.config import Qwen2Config
    from qwen2q.decode import StaticDecoder
    from qwen2q.model import Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    plain = Qwen2ForCausalLM(config).to(torch.float16).to(kt.DEVICE).eval()
    model = Qwen2ForCausalLM(config).to(torch.float16).to(kt.DEVICE).eval()
    model.load_state_dict(plain.state_dict())
    keys = list(model.state_dict())
    assert fused.use_fused_ops(model) == 2 * 5 + 1
    assert list(model.state_dict()) == keys
    assert model.model.layers[0].input_layernorm.weight is model.state_dict(keep_vars=True)[
        "model.layers.0.input_layernorm.weight"]
    ran = []
    for name in ("rms_norm", "rotary_qk", "rotary_qk_into_cache", "silu_mul"):
        monkeypatch.setattr(layer_ops, name, lambda *a, f=getattr(layer_ops, name), n=name: ran.append(n) or f(*a))
    monkeypatch.setattr(decode_attention, "decode_attention",
                        lambda *a, f=decode_attention.decode_attention: ran.append("attention") or f(*a))
    if kt.INTERPRET:  # let the kernels take CPU tensors (on a GPU they take these CUDA ones as they are)
        monkeypatch.setattr(fused, "_kernels_take", lambda t, *p: t.dtype in (torch.float16, torch.bfloat16))
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(1))
    outputs = []
    for m in (plain, model):  # plain: its modules are the PyTorch ones, whatever _kernels_take says
        dec = StaticDecoder(m, 12, use_graph=False)
        logits = [dec.prefill(ids)]
        for t in range(3):
            logits.append(dec.step(logits[-1].argmax(-1, keepdim=True)))
        outputs.append(torch.stack(logits).float())
    # per layer and forward: 2 norms, 1 rotation (into the cache on the static path), 1 activation; plus the final
    # norm; a prefill and 3 steps
    assert ran.count("rotary_qk") == 2 and ran.count("rotary_qk_into_cache") == ran.count("attention") == 3 * 2
    assert ran.count("rms_norm") == 4 * (2 * 2 + 1) and ran.count("silu_mul") == 4 * 2
    # fp16: the norms' sum order, and the decode steps' attention in fp32 where SDPA rounds scores and probabilities
    assert (outputs[1] - outputs[0]).abs().max() <= 5e-3 * outputs[0].abs().max()


def test_the_fused_modules_fall_back_off_the_gpu(monkeypatch):
    """On CPU tensors the fused modules are their parents, bit for bit (and on CUDA under QWEN2Q_KERNELS=reference,
    which _kernels_take reads)."""
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    fused_norm = fused._fused(norm)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert type(fused_norm) is fused.FusedRMSNorm and fused_norm.weight is norm.weight
    assert torch.equal(fused_norm(x), norm(x))
    assert all(torch.equal(a, b) for a, b in zip(fused_norm.add_and_norm(x, x), norm.add_and_norm(x, x)))
    assert not fused._kernels_take(x)
    if not kt.INTERPRET:
        xc = x.to(kt.DEVICE)
        assert fused._kernels_take(xc)
        assert not fused._kernels_take(xc, torch.ones(1, device=kt.DEVICE, requires_grad=True))  # autograd's
        with torch.no_grad():
            assert fused._kernels_take(xc, torch.ones(1, device=kt.DEVICE, requires_grad=True))
        monkeypatch.setenv("QWEN2Q_KERNELS", "reference")
        assert not fused._kernels_take(xc)


def _ops_per_layer(monkeypatch, use_fused: bool) -> int:
    """PyTorch ops (views aside) one static decode step dispatches per decoder layer (a 2-layer model's count less a
    1-layer model's), each fused layer kernel counted as one op: on a GPU each is one kernel launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qwen2q.config import Qwen2Config
    from qwen2q.decode import StaticDecoder
    from qwen2q.model import Qwen2ForCausalLM

    class Count(TorchDispatchMode):
        ops, paused = 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.to:  # its schema says "may alias": a kernel unless it did
                no_op = out is args[0]
            else:
                no_op = func.is_view or "alias" in str(func) or "detach" in str(func)
            if not self.paused and not no_op:
                self.ops += 1
            return out

    counter = Count()
    def one_launch(f):  # a fused kernel counts once, not the ops the interpreter runs it with
        def run(*a):
            counter.ops += 1
            counter.paused = True
            try:
                return f(*a)
            finally:
                counter.paused = False
        return run

    for name in ("rms_norm", "rotary_qk", "rotary_qk_into_cache", "silu_mul"):
        monkeypatch.setattr(layer_ops, name, one_launch(getattr(layer_ops, name)))
    monkeypatch.setattr(decode_attention, "decode_attention", one_launch(decode_attention.decode_attention))
    monkeypatch.setattr(fused, "_kernels_take", lambda t, *p: t.dtype == torch.float16)
    counts = []
    for layers in (1, 2):
        config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=320, max_position_embeddings=64)
        model = Qwen2ForCausalLM(config).to(torch.float16).eval()
        if use_fused:
            fused.use_fused_ops(model)
        dec = StaticDecoder(model, 12, use_graph=False)
        with torch.inference_mode():
            dec.prefill(torch.tensor([[1, 2, 3]]))
            counter.ops = 0
            with counter:
                dec._step()
        counts.append(counter.ops)
    return counts[1] - counts[0]


def test_a_decode_step_makes_12_launches_per_layer_with_the_fused_ops(monkeypatch):
    """7 matmuls, the attention kernel and the 4 fused steps, where the plain PyTorch layer makes 40 (a regression
    guard: each op here is a kernel inside the decode step's CUDA graph; SDPA counts one here, ~8 on a GPU, where
    grouped-query attention under a mask runs its math backend)."""
    if not kt.INTERPRET:
        pytest.skip("counts ops on CPU tensors; gpu-check counts the GPU kernels")
    assert _ops_per_layer(monkeypatch, use_fused=False) == 40
    assert _ops_per_layer(monkeypatch, use_fused=True) == 12

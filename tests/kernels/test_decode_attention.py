"""The static path's attention kernel (`kernels.decode_attention`) against a float64 reference of the masked
grouped-query attention it replaces, and against the model's own `CacheAttention` (SDPA under the mask)."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import math

import pytest
import torch

from qwen2q.kernels import decode_attention as da
from qwen2q.model import CacheAttention, static_attention_mask


def _reference(q, k, v, positions, window):
    """float64 softmax(q k^T / sqrt(D)) v, key j seen by token t when j <= positions[t] (and > positions[t] - window),
    the key / value heads shared by groups of HQ / HK query heads."""
    HQ, D, HK, S = q.shape[1], q.shape[3], k.shape[1], k.shape[2]
    k, v = (x.double().repeat_interleave(HQ // HK, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(D)
    seen = static_attention_mask(positions, S, window)
    scores = scores.masked_fill(~seen, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _case(B, HQ, HK, T, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g).to(dtype).transpose(1, 2)  # a view, as the model makes it
    k = (torch.randn(B, HK, S, D, generator=g) * 2).to(dtype)
    v = torch.randn(B, HK, S, D, generator=g).to(dtype)
    return q.to(kt.DEVICE), k.to(kt.DEVICE), v.to(kt.DEVICE)


def _bound(v: torch.Tensor) -> float:
    """One rounding of the output and p rounded to the dtype before p v: a few units of max |v|."""
    u = kt.UNIT_ROUNDOFF[v.dtype] * (2 if kt.INTERPRET else 1)  # the interpreter truncates
    return 4 * u * v.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, HQ, HK, T, S, positions, window, splits", [
    (1, 7, 1, 1, 40, [17], None, None),              # Qwen2 0.5B / 7B grouping, one token, one split
    (1, 4, 2, 1, 200, [199], None, None),            # the last position, several blocks
    (2, 4, 4, 3, 70, [5, 6, 7], None, None),         # three tokens at once, batch 2, no grouping
    (1, 8, 2, 1, 300, [250], None, 3),               # three splits and the combine, one of them past the position
    (1, 8, 2, 2, 300, [130, 131], 40, 4),            # a sliding window across a split boundary
    (1, 7, 1, 1, 1100, [1099], None, None),          # a long cache: splits_for gives 3
])
def test_decode_attention_matches_float64(B, HQ, HK, T, S, positions, window, splits, dtype):
    q, k, v = _case(B, HQ, HK, T, S, 64 if S < 1000 else 128, dtype, seed=S + T)
    pos = torch.tensor(positions, device=kt.DEVICE)
    got = da.decode_attention(q, k, v, pos, window, n_splits=splits)
    ref = _reference(q, k, v, pos, window)
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
    assert (got.double() - ref).abs().max().item() <= _bound(v)


def test_positions_past_the_current_one_are_never_read():
    """NaN in every cache row after the query's position (a cache being filled holds garbage there): the output
    stays finite and equal to the one over a clean cache."""
    q, k, v = _case(1, 4, 2, 1, 256, 64, torch.float16, seed=3)
    pos = torch.tensor([100], device=kt.DEVICE)
    clean = da.decode_attention(q, k, v, pos)
    k[:, :, 101:], v[:, :, 101:] = float("nan"), float("nan")
    assert torch.equal(da.decode_attention(q, k, v, pos), clean)


def test_it_agrees_with_the_models_sdpa_path():
    """`CacheAttention` (SDPA, grouped, under the additive mask the model makes) against the kernel, fp16."""
    q, k, v = _case(1, 14, 2, 1, 96, 64, torch.float16, seed=7)
    pos = torch.tensor([60], device=kt.DEVICE)
    allowed = static_attention_mask(pos, 96, None)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=kt.DEVICE).masked_fill(~allowed, float("-inf"))
    sdpa = CacheAttention()(q, k, v, mask, pos, None)
    assert (da.decode_attention(q, k, v, pos).double() - sdpa.double()).abs().max().item() <= 2 * _bound(v)


def test_it_refuses_what_it_cannot_take():
    q, k, v = _case(1, 6, 4, 1, 32, 64, torch.float16, seed=1)  # 6 query heads over 4 key heads
    with pytest.raises(ValueError, match="decode_attention"):
        da.decode_attention(q, k, v, torch.tensor([3], device=kt.DEVICE))
    q, k, v = _case(1, 4, 2, 1, 32, 64, torch.float16, seed=1)
    with pytest.raises(ValueError, match="decode_attention"):
        da.decode_attention(q, k, v, torch.tensor([3], device=kt.DEVICE, dtype=torch.int32))
    assert not da.applies(torch.zeros(1, 28, 9, 128, dtype=torch.float16), k)  # 7 x 9 rows > MAX_ROWS
    assert da.splits_for(512) == 1 and da.splits_for(513) == 2 and da.splits_for(10**6) == da.MAX_SPLITS

"""GPTQ rounding onto the int4 grid, against a float64 reference written the textbook way (explicit
inverse-Hessian downdates instead of the Cholesky form the implementation uses)."""
import pytest
import torch

from qwen2q.calibrate.gptq import DAMPING, gptq_round
from qwen2q.quantizers import int4


def gptq_quantize(weight, gram, group_size, act_order=False, mse_grid=True):
    """GPTQ onto AWQ's int4 grid: (dequantized fp32 [N, K], scales fp16 [K / G, N], zeros uint8 [K / G, N])."""
    grid = int4.FORMAT.grid({"group_size": group_size}, weight.shape[1])
    q, grids = gptq_round(weight, gram, grid, act_order=act_order, mse_grid=mse_grid)
    return q, torch.stack([s for s, _ in grids]), torch.stack([z for _, z in grids]).to(torch.uint8)


def _grid64(block, shrink=1.0):
    low, high = block.amin(1) * shrink, block.amax(1) * shrink
    scale = ((high - low).clamp(min=1e-5) / 15).half().double()
    return scale, (-torch.round(low / scale)).clamp(0, 15)


def _snap64(block, scale, zero):
    return ((torch.round(block / scale[:, None]) + zero[:, None]).clamp(0, 15) - zero[:, None]) * scale[:, None]


def _mse_grid64(block):
    """Each row's grid over 20 ranges shrunk from [min, max] to 0.8 [min, max], the one with the least
    sum |w - q|^2.4, tried one by one in float64."""
    tries = [_grid64(block, p) for p in torch.linspace(1, 0.8, 20, dtype=torch.float64).tolist()]
    errors = torch.stack([(block - _snap64(block, s, z)).abs().pow(2.4).sum(1) for s, z in tries])
    best = errors.argmin(0)
    rows = torch.arange(block.shape[0])
    return torch.stack([s for s, _ in tries])[best, rows], torch.stack([z for _, z in tries])[best, rows]


def reference_gptq(weight, gram, group_size, act_order=False, mse_grid=False):
    """Column by column in float64: q = Q(w_j); w -= (w_j - q) / Hinv[j, j] * Hinv[j, :]; downdate Hinv.

    act_order: visit the columns by decreasing diag(H), each on its group's grid taken from the
    original weight (groups stay consecutive columns).  mse_grid: grids from `_mse_grid64`."""
    grid64 = _mse_grid64 if mse_grid else _grid64
    w = weight.double().clone()
    h = gram.double().clone()
    h += DAMPING * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    static = [grid64(w[:, j : j + group_size]) for j in range(0, w.shape[1], group_size)]
    order = torch.argsort(torch.diagonal(gram.double()), descending=True, stable=True).tolist() \
        if act_order else range(w.shape[1])
    out = torch.empty_like(w)
    for step, j in enumerate(order):
        if act_order:
            scale, zero = static[j // group_size]
        elif j % group_size == 0:
            scale, zero = grid64(w[:, j : j + group_size])
        q = ((torch.round(w[:, j] / scale) + zero).clamp(0, 15) - zero) * scale
        out[:, j] = q
        w -= ((w[:, j] - q) / hinv[j, j])[:, None] * hinv[j][None, :]
        hinv -= hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
        w[:, j] = q
    return out


def correlated_inputs(tokens, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1  # uneven channel magnitudes, like real activations
    return (torch.randn(tokens, k, generator=g) @ mix) * scale


def output_error(x, w, q):
    return (x @ (w - q).t()).pow(2).mean().item()


@pytest.mark.parametrize("mse_grid", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 64])
def test_matches_the_float64_reference(group_size, act_order, mse_grid):
    torch.manual_seed(1)
    n, k = 24, 128
    w = torch.randn(n, k)
    x = correlated_inputs(512, k)
    q, _, _ = gptq_quantize(w, x.t() @ x, group_size, act_order=act_order, mse_grid=mse_grid)
    expected = reference_gptq(w, x.t() @ x, group_size, act_order, mse_grid).float()
    agree = torch.isclose(q, expected, rtol=0, atol=1e-5).float().mean().item()
    assert agree > 0.995, f"only {agree:.4f} of the weights took the reference's grid point"


@pytest.mark.parametrize("act_order", [False, True])
def test_codes_lie_exactly_on_the_stored_grid(act_order):
    torch.manual_seed(2)
    w = torch.randn(16, 256)
    x = correlated_inputs(300, 256)
    q, scales, zeros = gptq_quantize(w, x.t() @ x, 128, act_order=act_order)
    stored = int4.dequantize(int4.quantize(q, scales, zeros), torch.float32)
    assert torch.equal(stored, q)
    assert scales.dtype == torch.float16 and scales.shape == (2, 16)
    assert zeros.dtype == torch.uint8 and int(zeros.max()) <= 15


@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_is_well_below_round_to_nearest(act_order):
    torch.manual_seed(3)
    w = torch.randn(64, 256)
    x = correlated_inputs(1024, 256, seed=3)
    q, _, _ = gptq_quantize(w, x.t() @ x, 128, act_order=act_order)
    rtn = int4.fake_quantize(w, 128)
    assert output_error(x, w, q) < 0.8 * output_error(x, w, rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_get_zero_weight_and_shapes_are_checked(act_order):
    torch.manual_seed(4)
    w = torch.randn(8, 128)
    x = correlated_inputs(256, 128)
    x[:, 5] = 0
    q, scales, _ = gptq_quantize(w, x.t() @ x, 128, act_order=act_order)
    assert torch.isfinite(q).all()
    assert (q[:, 5].abs() <= scales[0].float() / 2 + 1e-6).all()  # the grid point nearest 0
    with pytest.raises(ValueError, match="gram must be"):
        gptq_quantize(w, torch.eye(64), 128)


def reference_gptq_rows(weight, gram):
    """GPTQ onto a symmetric per-row int8 grid (absmax / 127 of the original row), textbook float64."""
    w = weight.double().clone()
    h = gram.double().clone()
    h += DAMPING * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    absmax = w.abs().amax(1)
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        q = torch.round(w[:, j] * (127 / absmax)).clamp(-127, 127) * (absmax / 127)
        out[:, j] = q
        w -= ((w[:, j] - q) / hinv[j, j])[:, None] * hinv[j][None, :]
        hinv -= hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
        w[:, j] = q
    return out


def test_int8_row_grid_matches_the_float64_reference_and_stores_exactly():
    """The algorithm is the format's grid's: bitsandbytes int8 (one absmax per row) through the same code."""
    from qwen2q.quantizers import int8

    torch.manual_seed(5)
    w = torch.randn(24, 128)
    x = correlated_inputs(512, 128, seed=5)
    grid = int8.FORMAT.grid({}, 128)
    q, grids = gptq_round(w, x.t() @ x, grid, mse_grid=False)
    expected = reference_gptq_rows(w, x.t() @ x).float()
    agree = torch.isclose(q, expected, rtol=0, atol=1e-5).float().mean().item()
    assert agree > 0.995, f"only {agree:.4f} of the weights took the reference's grid point"
    stored = int8.dequantize(grid.encode(q, grids), torch.float32)
    assert torch.equal(stored, q)
    assert output_error(x, w, q) < 0.8 * output_error(x, w, int8.dequantize(int8.quantize(w), torch.float32))

r"""Activation-aware weight quantization (AWQ, Lin et al. 2023) of one Qwen2 decoder layer.

Scale search.  Linears that read the same input X [T, C] (the output of a previous op) form a scaling
group.  AWQ looks for per-input-channel scales s [C] minimising the output error of the module that
consumes them:

    L(s) = || f(X; Q(W * s) / s) - f(X; W) ||^2
    s(α) = x_mean^α / (w_mean^(1-α) + 1e-4),   normalised by sqrt(max s * min s),   α ∈ {0, 0.05, ..., 0.95}

where Q is the target format's quantize-dequantize (`Format.fake_quantize`: AutoAWQ's is round-to-nearest
int4 with groups of G input channels; each linear of a group may have its own), x_mean[c] = mean_t |X[t, c]| and
w_mean[c] = mean over output rows of |W[o, c]| / max|W[o, group(c)]| ("duo scaling"), groups of G channels
sharing a scale in the format.  The best s is
folded away exactly, so the float model is unchanged: the previous op's output is divided by s (an
RMSNorm's weight, or the rows of a linear) and each linear's input columns are multiplied by s.

Clipping.  Then, for every linear but q/k (whose errors the softmax amplifies), each (output channel,
group of G channels sharing a scale) gets the clip bound max|W| * (1 - i/20), i = 0..9, that minimises
the group-wise partial output error of the format's quantize-dequantize on up to 512 input tokens; the
weight is clamped to it before the final quantization.

Weights, scales and statistics are fp32; the pipeline runs the layer forwards the search scores in
bf16 autocast by default (`pipeline.forward_precision`) or fp32, never fp16 (which overflowed on
Qwen2-72B in AutoAWQ); a non-finite loss or scale stops the run with an error naming the layer.
"""
from __future__ import annotations

import torch
from torch import nn

from collections.abc import Callable, Sequence

from qwen2q.architecture import ScaleGroup
from qwen2q.errors import Qwen2qError

FakeQuantize = Callable[[torch.Tensor], torch.Tensor]  # weight [out, in] -> quantized and dequantized, fp32

ALPHA_GRID = [i / 20 for i in range(20)]
CLIP_SHRINKS = [1 - i / 20 for i in range(10)]  # 1.0, 0.95, ..., 0.55
CLIP_TOKENS = 512
NO_CLIP = ("q_proj", "k_proj")


def w_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """fp32 [C]: mean over all rows of |W| normalised by each (row, group)'s max."""
    w = torch.cat([x.float() for x in weights], dim=0)
    g = w.abs().view(-1, group_size)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.view(w.shape).mean(0)


def scales_for(alpha: float, x_mean: torch.Tensor, wmean: torch.Tensor) -> torch.Tensor:
    s = (x_mean.pow(alpha) / (wmean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _get(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path)


@torch.no_grad()
def search_scales(layer: nn.Module, group: ScaleGroup, x_mean: torch.Tensor, inputs: torch.Tensor,
                  run_inspect, group_size: int, where: str,
                  fake_quant: FakeQuantize | Sequence[FakeQuantize]) -> tuple[torch.Tensor, float, float]:
    """Grid-search α for `group`; return (best s fp32 [C], best α, its loss).

    inputs: the search sample of the group's input X; run_inspect(inputs) -> the inspected module's
    output, computed with whatever weights the linears hold at call time.  fake_quant(w) -> Q(w) fp32:
    one for every linear of the group, or one per linear (in `group.linears` order); `group_size`: the
    input channels sharing a scale, w_mean's groups.
    """
    linears = [_get(layer, n) for n in group.linears]
    fakes = list(fake_quant) if isinstance(fake_quant, Sequence) else [fake_quant] * len(linears)
    originals = [lin.weight.data.clone() for lin in linears]
    reference = run_inspect(inputs)
    wmean = w_mean(originals, group_size)
    best = (None, None, float("inf"))
    for alpha in ALPHA_GRID:
        s = scales_for(alpha, x_mean, wmean)
        for lin, w, fake in zip(linears, originals, fakes):
            lin.weight.data = fake(w * s) / s
        loss = (run_inspect(inputs) - reference).float().pow(2).mean().item()
        if loss < best[2]:
            best = (s, alpha, loss)
    for lin, w in zip(linears, originals):
        lin.weight.data = w
    s, alpha, loss = best
    if s is None or not torch.isfinite(s).all():
        raise Qwen2qError(f"{where}: AWQ scale search for {', '.join(group.linears)} gave no finite loss "
                          "(NaN/Inf in the activations or weights)")
    return s, alpha, loss


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the previous op's output by s and multiply the linears' input columns by s (exact in real numbers)."""
    prev = _get(layer, group.prev)
    if isinstance(prev, nn.Linear):
        prev.weight.data = prev.weight.data / s[:, None]
        if prev.bias is not None:
            prev.bias.data = prev.bias.data / s
    else:  # RMSNorm: y = w * x / rms(x)
        prev.weight.data = prev.weight.data / s
    for name in group.linears:
        lin = _get(layer, name)
        lin.weight.data = lin.weight.data * s[None, :]


@torch.no_grad()
def search_clip(weight: torch.Tensor, inputs: torch.Tensor, group_size: int, fake_quant: FakeQuantize,
                rows_per_batch: int = 64) -> torch.Tensor:
    """Per (output channel, group) clip bound fp32 [N, K/G, 1] for weight [N, K] given inputs [T, K];
    fake_quant(w [rows, K]) -> the format's Q(w) fp32, with groups of `group_size` channels."""
    n_out, k = weight.shape
    step = max(1, inputs.shape[0] // CLIP_TOKENS)
    x = inputs[::step][:CLIP_TOKENS].float().view(-1, k // group_size, group_size)  # [T, g, G]
    bounds = []
    for r in range(0, n_out, rows_per_batch):
        w = weight[r : r + rows_per_batch].float().view(-1, k // group_size, group_size)  # [o, g, G]
        original_max = w.abs().amax(dim=-1, keepdim=True)  # [o, g, 1]
        reference = torch.einsum("tgk,ogk->otg", x, w)
        best_err = torch.full(original_max.shape, float("inf"), device=weight.device)
        best = original_max.clone()
        for shrink in CLIP_SHRINKS:
            bound = original_max * shrink
            q = fake_quant(w.clamp(-bound, bound).view(w.shape[0], k)).view_as(w)
            err = (torch.einsum("tgk,ogk->otg", x, q) - reference).pow(2).mean(dim=1, keepdim=True)
            err = err.transpose(1, 2)  # [o, g, 1]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, bound, best)
        bounds.append(best)
    return torch.cat(bounds)


@torch.no_grad()
def apply_clip(linear: nn.Linear, bound: torch.Tensor, group_size: int) -> None:
    n_out, k = linear.weight.shape
    w = linear.weight.data.view(n_out, k // group_size, group_size)
    linear.weight.data = w.clamp(-bound, bound).view(n_out, k)

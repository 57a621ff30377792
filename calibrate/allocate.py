r"""Choosing one option per module group: the multiple-choice knapsack behind mixed precision.

Each group g (e.g. layer 3's q/k/v, which must share a format) has options k, each with a stored size
b[g, k] (bytes) and a predicted KL increase d[g, k].  Two questions:

    by="kl":    minimise  sum_g b[g, k_g]  subject to  sum_g d[g, k_g] <= budget      (--kl-budget)
    by="size":  minimise  sum_g d[g, k_g]  subject to  sum_g b[g, k_g] <= budget      (--target-bits)

Solved exactly by dynamic programming over the constrained quantity, cut into `resolution` equal units
and each option's amount rounded *up* to whole units: any assignment the program accepts meets the real
constraint (the rounding only gives away at most one unit per group of slack).  Ties go to the option
listed first, so the answer is deterministic.  Cost O(groups x options x resolution), a few hundred
milliseconds for Qwen2-72B's 320 groups.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwen2q.errors import Qwen2qError

RESOLUTION = 20000


def allocate(sizes: Sequence[Sequence[float]], kls: Sequence[Sequence[float]], budget: float, by: str = "kl",
             resolution: int = RESOLUTION, floor: Sequence[int] | None = None) -> list[int]:
    """The chosen option index of each group.  sizes, kls: one row per group, one entry per option (a
    group may have fewer options than another: pad with NaN, never chosen).  floor: per group, the lowest
    option index it may take (options are ordered by the caller; used to only ever move groups "up" when
    correcting).  Qwen2qError when no assignment meets the budget."""
    if by not in ("kl", "size"):
        raise ValueError(f"by must be 'kl' or 'size', not {by!r}")
    sizes_a = np.asarray(sizes, dtype=np.float64)
    kls_a = np.asarray(kls, dtype=np.float64)
    if sizes_a.shape != kls_a.shape or sizes_a.ndim != 2 or sizes_a.shape[0] == 0:
        raise ValueError(f"sizes and kls must be the same [groups, options] shape, got {sizes_a.shape} and {kls_a.shape}")
    weight, cost = (kls_a, sizes_a) if by == "kl" else (sizes_a, kls_a)
    allowed = np.isfinite(weight) & np.isfinite(cost)
    if floor is not None:
        allowed &= np.arange(weight.shape[1])[None, :] >= np.asarray(floor)[:, None]
    if budget < 0 or not np.isfinite(budget):
        raise Qwen2qError(f"the budget must be a finite number >= 0, got {budget}")
    unit = budget / resolution if budget > 0 else 1.0
    units = np.where(allowed, np.ceil(np.clip(weight, 0, None) / unit - 1e-9), np.inf)
    units = np.where(units < 0, 0, units)
    if budget == 0:
        units = np.where(allowed & (weight <= 0), 0, np.inf)
    width = resolution + 1
    best = np.zeros(width)  # best[c]: least cost with at most c units used (monotone in c)
    picks = np.zeros((weight.shape[0], width), dtype=np.int16)
    for g in range(weight.shape[0]):
        candidates = np.full((weight.shape[1], width), np.inf)
        for k in range(weight.shape[1]):
            if not np.isfinite(units[g, k]) or units[g, k] > resolution:
                continue
            u = int(units[g, k])
            candidates[k, u:] = best[: width - u] + cost[g, k]
        picks[g] = np.argmin(candidates, axis=0)  # first minimum: the earlier option on ties
        best = candidates[picks[g], np.arange(width)]
    if not np.isfinite(best[-1]):
        raise Qwen2qError(_infeasible(by, budget, weight, allowed))
    choice, c = [0] * weight.shape[0], resolution
    for g in range(weight.shape[0] - 1, -1, -1):
        k = int(picks[g, c])
        choice[g] = k
        c -= int(units[g, k])
    return choice


def _infeasible(by: str, budget: float, weight: np.ndarray, allowed: np.ndarray) -> str:
    least = float(np.where(allowed, weight, np.inf).min(axis=1).sum())
    if by == "kl":
        return f"no choice of formats keeps the predicted KL under {budget:g} (the least is {least:.4g})"
    return f"no choice of formats fits in {budget:.0f} bytes (the smallest takes {least:.0f})"


def totals(sizes, kls, choice: Sequence[int]) -> tuple[float, float]:
    """(total size, total predicted KL) of an assignment."""
    return (float(sum(sizes[g][k] for g, k in enumerate(choice))), float(sum(kls[g][k] for g, k in enumerate(choice))))

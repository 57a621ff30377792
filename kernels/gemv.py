"""The M = 1 GEMV skeleton every format's one-row kernel shares: y [1, N] = x [1, K] @ W^T (+ bias).

Each program owns BLOCK_N rows of W and a run of K blocks (a block: the K indices one iteration reads from every
row); `tiling.gemv_config` picks BLOCK_N and SPLIT_K from the shape.  A format's kernel supplies only the
inner step (load a block of packed weights, turn it into products with x); the pieces here are the rest:

    program           the program's split, K blocks [first, last), rows, and the rows it loads (clamped: no masks)
    next_block        the block to load one iteration ahead; the last iteration reloads its own block, so the
                      look-ahead load never needs a mask
    store             SPLIT_K == 1: y (+ bias), cast to the output dtype, written by the kernel itself (no
                      second launch); SPLIT_K > 1: fp32 partials [SPLIT_K, 1, N] for `splitk.reduce`, which
                      sums them in a fixed order (deterministic); or, with `splitk.FIXUP`, the partials and then
                      the program that finishes a tile last sums them in the same order and writes y (no second
                      launch either; opt-in until a GPU has timed and checked it)
    plan / launch     the host side: the grid, the split and the tensor the kernel writes; the Launch
    finish            run it, and the reduce launch when there is one
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qwen2q.kernels import splitk
from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import Config


@triton.jit
def program(BLOCKS_PER_SPLIT, total_blocks, N, BLOCK_N: tl.constexpr):
    """(pid_k, first, last, offs_n, rows) of this program: its split, its K blocks [first, last), its rows of W
    (int32 [BLOCK_N]; the last tile may reach past N) and the rows it loads: offs_n clamped to N - 1, so that a
    partial last tile needs no load masks (its extra rows reload row N - 1 and are never stored)."""
    pid_k = tl.program_id(1)
    first = pid_k * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, total_blocks)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_k, first, last, offs_n, tl.minimum(offs_n, N - 1)


@triton.jit
def next_block(b, first, last):
    """The block to load while block b is computed: b + 1, or b itself on the last iteration (a harmless
    in-bounds reload instead of a masked load; one min, where a wrap to `first` takes a compare and a select)."""
    return tl.minimum(b + 1, last - 1)


@triton.jit
def _finish_y(y, offs_n, mask, bias_ptr, y_ptr, HAS_BIAS: tl.constexpr):
    """y fp32 [BLOCK_N] + bias, cast once to y's dtype, stored."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store(y, offs_n, N, bias_ptr, out_ptr, pid_k, stride_os, y_ptr, counters_ptr, HAS_BIAS: tl.constexpr,
          SPLIT_K: tl.constexpr, FIXUP: tl.constexpr):
    """Write y fp32 [BLOCK_N] for rows offs_n below N: the output itself (bias added, cast once) when SPLIT_K == 1,
    else row pid_k of the fp32 partials (out_ptr); with FIXUP, the program that arrives last at its tile's counter
    (int32, zero between launches) then sums the tile's SPLIT_K partials in split order, as `splitk.reduce` does (the
    same bits), writes y [1, N] (y_ptr) and sets the counter back to zero."""
    mask = offs_n < N
    if SPLIT_K == 1:
        _finish_y(y, offs_n, mask, bias_ptr, out_ptr, HAS_BIAS)
    else:
        tl.store(out_ptr + pid_k * stride_os + offs_n, y, mask=mask)
        if FIXUP:
            if splitk.arrive_last(counters_ptr, tl.program_id(0), SPLIT_K):
                total = tl.zeros_like(y)
                for s in tl.static_range(SPLIT_K):  # .cg: from L2, never a line this SM cached earlier
                    total += tl.load(out_ptr + s * stride_os + offs_n, mask=mask, other=0.0, cache_modifier=".cg")
                _finish_y(total, offs_n, mask, bias_ptr, y_ptr, HAS_BIAS)
                splitk.reset(counters_ptr, tl.program_id(0))


@dataclass(frozen=True)
class Plan:
    """grid (ceil(N / BLOCK_N), SPLIT_K); blocks_per_split: each program's run of K blocks; target: what the kernel
    writes (out itself when SPLIT_K == 1, else fp32 partials [SPLIT_K, 1, N]); out: y [1, N]; counters: the
    fix-up's arrival counters (`splitk.counters`) when the kernel finishes the split itself, else None."""

    grid: tuple[int, int]
    blocks_per_split: int
    split_k: int
    target: torch.Tensor
    out: torch.Tensor
    counters: torch.Tensor | None = None


def plan(N: int, blocks: int, config: Config, out: torch.Tensor) -> Plan:
    """The launch geometry for W [N, blocks * BLOCK_K] under `config`; no split is left empty.  With `splitk.FIXUP`
    a split kernel writes y itself (`store`), where counters can be had (`splitk.counters`)."""
    per_split = triton.cdiv(blocks, config.SPLIT_K)
    split_k = triton.cdiv(blocks, per_split)
    grid = (triton.cdiv(N, config.BLOCK_N), split_k)
    if split_k == 1:
        return Plan(grid, per_split, split_k, out, out)
    target = torch.empty((split_k, 1, N), dtype=torch.float32, device=out.device)
    counters = splitk.counters(out.device, grid[0]) if splitk.FIXUP else None
    return Plan(grid, per_split, split_k, target, out, counters)


def launch(kernel, p: Plan, config: Config, args: tuple, bias: torch.Tensor | None, **constexprs) -> Launch:
    """The Launch of a GEMV kernel: `args` in its order, and what every GEMV takes besides its own constexprs
    (y_ptr, counters_ptr, HAS_BIAS, SPLIT_K, BLOCK_N, FIXUP).  With the fix-up the launch's result is y itself."""
    fixup = p.counters is not None
    kwargs = dict(y_ptr=p.out if fixup else None, counters_ptr=p.counters, HAS_BIAS=bias is not None,
                  SPLIT_K=p.split_k, BLOCK_N=config.BLOCK_N, FIXUP=fixup, **constexprs,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return Launch(kernel, p.grid, args, kwargs, config, p.out if fixup else p.target)


finish = splitk.finish  # run the launch; reduce its partials into out when it wrote partials

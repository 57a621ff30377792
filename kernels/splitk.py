"""Second pass of the decode path: sum the fp32 split-K partials in a fixed order, add the bias, cast; and the
decode kernels' epilogue, which writes y itself when there is no split (SPLIT_K == 1: no second launch).

With `FIXUP` (opt-in until a GPU has checked and timed it: `dev gpu-check`, variant "fixup") a split kernel
finishes itself: every program stores its partials, then counts itself in at its output tile's counter
(`arrive_last`: a barrier, one `atom.acq_rel.gpu` add); the program that arrives last sums the tile's partials in
split order, as `reduce` does (the same fp32 adds: the same bits), writes y and sets the counter back to zero
(`reset`), so the next launch or graph replay starts from zero.  `fixup_store` is that epilogue for the decode
kernels, `gemv.store` for the GEMVs; `fixup_arguments` gives a launch what it needs.

A fixed-order sum instead of fp32 atomics makes decode outputs bit-reproducible run to run (sampling
with a seed repeats itself). The partials of one layer are M * N * SPLIT_K * 4 bytes, which stay in L2
next to the weight bytes they replace.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2q.kernels.launch import Launch
from qwen2q.kernels.tiling import store_output

_BLOCK_M = 16
_BLOCK_N = 256
FIXUP = False  # split kernels finish in the kernel (module docstring); the launch builders read it


@triton.jit
def splitk_reduce_kernel(
    # Pointers: partials fp32 [SPLIT_K, M, N], bias [N] (or None), out [M, N]
    partial_ptr, bias_ptr, out_ptr,
    # Sizes
    M, N, SPLIT_K,
    # Strides
    stride_ps, stride_pm, stride_pn,
    stride_om, stride_on,
    # Meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = partial_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    store_output(out_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)


def reduce(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out [M, N] = partials.sum(0) + bias, in out's dtype. partials: fp32 [SPLIT_K, M, N]."""
    split_k, M, N = partials.shape
    if partials.dtype != torch.float32 or out.shape != (M, N):
        raise ValueError(f"partials must be fp32 [S, M, N] and out [M, N]; got {partials.dtype} "
                         f"{list(partials.shape)} and {list(out.shape)}")
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))
    splitk_reduce_kernel[grid](
        partials, bias, out,
        M, N, split_k,
        partials.stride(0), partials.stride(1), partials.stride(2),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
    )
    return out


@triton.jit
def decode_store(acc, out_ptr, bias_ptr, pid_k, offs_m, offs_n, M, N, stride_os, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """A decode program's result acc fp32 [BLOCK_M, BLOCK_N]: y itself (bias added, cast once) when SPLIT_K == 1,
    else its split's fp32 partials (out_ptr: partials [SPLIT_K, M, N], stride_os its split stride)."""
    if SPLIT_K == 1:
        store_output(out_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, HAS_BIAS)
    else:
        ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def arrive_last(counters_ptr, tile, n_splits):
    """True in the one program of the `n_splits` computing output tile `tile` that counts itself in last at the
    tile's int32 counter; the program's stores before it are visible to that one (barrier, then acq_rel)."""
    tl.debug_barrier()
    return tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu") == n_splits - 1


@triton.jit
def reset(counters_ptr, tile):
    """Set tile's counter back to zero for the next launch (by the program `arrive_last` chose)."""
    tl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def fixup_store(acc, partial_ptr, y_ptr, counters_ptr, bias_ptr, pid_k, tile, n_splits, offs_m, offs_n, M, N,
                stride_os, stride_om, stride_on, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    """A split decode program's acc fp32 [BLOCK_M, BLOCK_N]: its partials (split pid_k of partial_ptr [n_splits, M,
    N]), then, in the tile's last program, y [M, N] = the partials summed in split order + bias (`reduce`'s bits)."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = partial_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(ptrs + pid_k * stride_os, acc, mask=mask)
    if arrive_last(counters_ptr, tile, n_splits):
        total = tl.zeros_like(acc)
        for s in range(0, n_splits):  # .cg: from L2, never a line this SM cached in an earlier launch
            total += tl.load(ptrs + s * stride_os, mask=mask, other=0.0, cache_modifier=".cg")
        store_output(y_ptr, total, bias_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, HAS_BIAS)
        reset(counters_ptr, tile)


def target(split_k: int, out: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """What a decode kernel writing out [M, N] in `split_k` splits writes, and its (split, row, column) strides: out
    itself when split_k == 1, else new fp32 partials [split_k, M, N]."""
    if split_k == 1:
        return out, (0, out.stride(0), out.stride(1))
    partials = torch.empty((split_k, *out.shape), dtype=torch.float32, device=out.device)
    return partials, partials.stride()


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # buffers a larger one replaced: kept, since captured graphs may point at them


def counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """int32 arrival counters, one per output tile, zero between launches (each fix-up launch sets back what it
    counts): one buffer per device, shared by every launch on it, so launches that use it must not run concurrently
    (qwen2q runs one stream).  None while a CUDA graph is being captured and the buffer is missing or too small (it
    is made outside captures, at the warm-up call before one; the caller then reduces in a second launch).  A buffer
    is never freed: a graph captured with it keeps using it."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must find one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = _COUNTERS.get(device)
    if buffer is None or buffer.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buffer is not None:
            _OUTGROWN.append(buffer)
        buffer = _COUNTERS[device] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return buffer


def fixup_arguments(split_k: int, tiles: int, out: torch.Tensor, written: torch.Tensor
                    ) -> tuple[torch.Tensor, dict]:
    """(what a decode launch returns, the kwargs `fixup_store` needs: y_ptr, counters_ptr, stride_ym, stride_yn,
    FIXUP) for a launch of `tiles` output tiles writing `written` (`target`): out itself and FIXUP where the split
    finishes in the kernel (`FIXUP`, split_k > 1, counters to be had), else `written` and no fix-up."""
    counters_ = counters(out.device, tiles) if FIXUP and split_k > 1 else None
    if counters_ is None:
        return written, dict(y_ptr=None, counters_ptr=None, stride_ym=0, stride_yn=0, FIXUP=False)
    return out, dict(y_ptr=out, counters_ptr=counters_, stride_ym=out.stride(0), stride_yn=out.stride(1), FIXUP=True)


def finish(launch: Launch, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Run a decode or GEMV launch; reduce its partials into out when it wrote partials."""
    result = launch()
    return out if result is out else reduce(result, bias, out)

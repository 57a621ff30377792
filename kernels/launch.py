"""One kernel launch as data, so that what the runtime launches and what `report` compiles are one object.

Each format's wrapper (`int4_gemm`, `nf4_gemm`, `int8_gemm`) builds a `Launch` from the tensors it is given
and the config `tiling` picks; calling the launch runs `kernel[grid](*args, **kwargs)` on the tensors'
device.  `qwen2q.kernels.report` passes the same arguments to Triton's `warmup` instead, so Triton
specialises them (pointer alignment, integers equal to 1 or divisible by 16) and compiles them exactly as
it does for the launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # tiling imports triton; a Launch is read (by `report`) without it
    from qwen2q.kernels.tiling import Config


@dataclass(frozen=True)
class Launch:
    """kernel: a `triton.JITFunction`; grid: program counts (1 to 3 axes); args: the kernel's positional
    arguments (tensors, ints, floats) in its order; kwargs: its constexprs by name plus `num_warps` and
    `num_stages`; config: the tiling config they came from; out: the tensor the kernel writes (fp32
    partials [SPLIT_K, M, N] on the decode path, y [M, N] on the GEMM path)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict[str, Any]
    config: Config
    out: torch.Tensor

    def __call__(self) -> torch.Tensor:
        """Launch on the current device and return `out`."""
        self.kernel[self.grid](*self.args, **self.kwargs)
        return self.out

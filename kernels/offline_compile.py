"""Compile a `Launch` for a CUDA architecture on a machine without a GPU, as a launch on that GPU would.

`compile_launch(launch, arch)` hands the launch's own arguments to Triton's `JITFunction.warmup`, which runs
the same binder as a launch: it specialises pointers by 16-byte alignment and integers by value (== 1 is
a constant, divisible by 16 an attribute), builds the same cache key and compiles with the same options.
Only the driver is replaced, by one that names the target (`GPUTarget("cuda", arch, 32)`) and never
touches a device.  The tensors may live on the meta device (data_ptr() 0: aligned, as every PyTorch CUDA
allocation is).  Needs a process without TRITON_INTERPRET.
"""
from __future__ import annotations

import contextlib

from qwen2q.kernels.launch import Launch


class _TargetOnlyDriver:
    """The part of a Triton driver that compiling needs: a target, a device key and a stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"offline-sm_{self.target.arch}"  # keys Triton's in-memory cache apart from a real device's

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def _driver_for(arch: int):
    from triton.runtime import driver

    previous = driver._active  # None until something asks for the real driver, which fails without a GPU
    driver.set_active(_TargetOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def compile_launch(launch: Launch, arch: int):
    """The triton CompiledKernel `launch` runs on an sm_`arch` GPU (asm: ttir, ttgir, llir, ptx, cubin;
    metadata.shared: dynamic shared memory bytes)."""
    from qwen2q.kernels.tiling import interpreting

    if interpreting():
        raise RuntimeError("TRITON_INTERPRET=1: the interpreter does not compile; run in a process without it")
    with _driver_for(arch):
        return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)

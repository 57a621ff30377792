"""The input check every quantizer shares: a finite, non-empty, 2-D float weight [out_features, in_features]."""
import contextlib

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The quantizers' loops work on chunks of fewer values than torch's parallel grain (32768), so each op
# runs inline in the calling thread.  An op over more values forks onto every torch thread and waits for
# all of them: on a busy 2-core machine a descheduled thread makes each such op wait a time slice (~7 ms
# measured, for 0.1 ms of work), and a loop of small chunks would pay that per op.
SERIAL_VALUES = 32000

@contextlib.contextmanager
def serial():
    """Run torch ops inline in the calling thread (torch.set_num_threads(1)), restoring the count after.

    Round-to-nearest quantization is a few dozen ops per weight on scale/zero-sized tensors (~34K values,
    just above the grain) besides its serial chunks; forked onto both threads of a busy machine each waits
    for a descheduled one (2-4 ms measured, for microseconds of work: 10 s of a 25 s int4 run).  With the
    OpenMP backend the thread count is the calling thread's setting.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_ROUNDER = 1.5 * 2**23  # fp32 sums in [2**23, 2**24) are whole numbers, rounded to nearest, ties to even


def round_small_(x: torch.Tensor) -> torch.Tensor:
    """torch.round_ (half to even) for fp32 `x` with every |value| < 2**22 (inf stays inf), in place.

    torch.round forks onto every thread above ~2048 values (a ~10 ms wait per call on a busy machine,
    measured); two additions round the same way and run inline: x + 1.5 * 2**23 lands where the fp32
    spacing is 1, so the addition itself rounds x to the nearest whole number, ties to the even one (the
    constant is even), and subtracting the constant again is exact.  Only a zero's sign can differ.
    """
    return x.add_(_ROUNDER).sub_(_ROUNDER)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite (non-float tensors: True), exactly, in about one cheap pass.

    A sum is NaN or infinite whenever one of its terms is (IEEE addition propagates both), so a finite
    sum proves every value finite; it reads the data once with a vectorised reduction and makes no
    per-element temporary: ~10x faster on CPU than `torch.isfinite(t).all()`, which writes a bool per value.  A sum
    that is not finite (a NaN/Inf, or finite values whose sum overflows) is settled by the exact
    elementwise test.
    """
    if not t.is_floating_point():
        return True
    # bf16 and fp32 sum in their own dtype (the fastest reduction; their range is fp32's); fp16 in fp32,
    # since a half-precision total overflows at 65504
    total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    if torch.isfinite(total):
        return True
    return bool(torch.isfinite(t).all())


NON_FINITE_WEIGHT = "weight contains NaN or Inf values; cannot quantize"


def check_weight(weight: torch.Tensor, values: bool = True) -> None:
    """Raise ValueError naming what is wrong with `weight` [out_features, in_features], or return.

    values=False leaves out the NaN/Inf scan, for a quantizer whose own pass over the weight proves its
    values finite (int8: every row's max |value| is finite) and raises ValueError(NON_FINITE_WEIGHT) itself.
    """
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be non-empty [out_features, in_features], got {list(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight dtype must be float32, float16 or bfloat16, got {weight.dtype}")
    if values and not all_finite(weight):
        raise ValueError(NON_FINITE_WEIGHT)

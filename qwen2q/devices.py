"""The one place a `--device` / `device=` value is checked: "cpu", "cuda" or "cuda:N".

Anything else (an unknown type, CUDA on a torch build without it or with no visible device, an index
past the devices present) is a `DeviceError` naming the value, instead of torch's AssertionError or
RuntimeError from deep inside the first tensor move.
"""
from __future__ import annotations

import torch

from qwen2q.errors import Qwen2qError

SUPPORTED = "cpu, cuda or cuda:N"


class DeviceError(Qwen2qError):
    """A device string that is malformed, of an unsupported type, or not present on this machine."""


def parse_device(device: str | torch.device) -> torch.device:
    """"cpu", "cuda", "cuda:N" or a torch.device -> that torch.device, checked against this machine."""
    if not isinstance(device, (str, torch.device)):
        raise DeviceError(f"device must be a string like {SUPPORTED}, got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device {str(device)!r} is not a device; use {SUPPORTED}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device {str(device)!r}: type {dev.type!r} is not supported; use {SUPPORTED}")
    if not torch.backends.cuda.is_built():
        raise DeviceError(f"device {str(device)!r}: this torch build ({torch.__version__}) has no CUDA support")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r}: no CUDA device is available")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(f"device {str(device)!r}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                          f"device{'' if count == 1 else 's'} (cuda:0 .. cuda:{count - 1})")
    return dev

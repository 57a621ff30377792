"""The input check every quantizer shares: a finite, non-empty, 2-D float weight [out_features, in_features]."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(weight: torch.Tensor) -> None:
    """Raise ValueError naming what is wrong with `weight`, or return."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be non-empty [out_features, in_features], got {list(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight dtype must be float32, float16 or bfloat16, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values; cannot quantize")

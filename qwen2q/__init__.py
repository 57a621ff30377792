"""qwen2q: quantized inference for Qwen2 language models.

`qwen2q.load(path)` returns a ready-to-use model with its tokenizer; `qwen2q.quantize(src, dst, recipe)`
writes a quantized checkpoint; the `qwen2q` command quantizes, evaluates and runs checkpoints.  See README.md.
"""
from qwen2q._version import __version__


def load(*args, **kwargs):
    """Load a Qwen2 checkpoint directory; see `qwen2q.api.load` for the arguments."""
    from qwen2q.api import load as _load

    return _load(*args, **kwargs)


def quantize(*args, **kwargs):
    """Quantize a checkpoint directory into a new one; see `qwen2q.quantization.quantize` for the arguments."""
    from qwen2q.quantization import quantize as _quantize

    return _quantize(*args, **kwargs)

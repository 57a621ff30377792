"""The formats qwen2q reads and writes, by name.

Every module of this package that sets `FORMAT` (an instance of `qwen2q.quantizers.format.Format`) is a
format; they are found on first use, so a new format is one new module and nothing else here.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from .format import Format

_FORMATS: dict[str, Format] = {}


def _discover() -> dict[str, Format]:
    if not _FORMATS:
        package = __name__.rpartition(".")[0]
        for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda i: i.name):
            fmt = getattr(importlib.import_module(f"{package}.{info.name}"), "FORMAT", None)
            if isinstance(fmt, Format):
                if fmt.name in _FORMATS:
                    raise RuntimeError(f"two formats are named {fmt.name!r}")
                _FORMATS[fmt.name] = fmt
    return _FORMATS


def names() -> list[str]:
    """Every registered format's name, sorted."""
    return sorted(_discover())


def get(name: str) -> Format:
    """The format registered as `name`; ValueError naming the known ones otherwise."""
    formats = _discover()
    if name not in formats:
        raise ValueError(f"unknown quantization format {name!r}; known: {', '.join(sorted(formats))}")
    return formats[name]


def for_config(config: Mapping[str, Any]) -> Format | None:
    """The format that reads this config.json `quantization_config`, or None."""
    for fmt in _discover().values():
        if fmt.reads_config(config):
            return fmt
    return None

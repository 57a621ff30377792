"""`qwen2q.quantize(src, dst, recipe, calibration=None, ...) -> Report`: the one library entry point for
writing a quantized checkpoint; the CLI only parses options into these arguments and renders the report.

The recipe is a `QuantConfig` (or a method name: "nf4", "int8", "int4", "awq"): which format each decoder
linear gets, and which stay in full precision.  Round-to-nearest recipes stream tensor by tensor
(`qwen2q.convert`); a calibrated recipe (method "awq", or "nf4" with `calibration`: AWQ's scale search in
front of plain NF4) runs one decoder layer at a time (`qwen2q.calibrate.pipeline`).  Both write through
the same destination rules (`qwen2q.destination`): nothing the user owns is replaced or lost.

Every combination is checked here, before any work: calibration only where the recipe calibrates, no
`skip` or non-finite opt-out with calibration (calibration needs every linear, finite), a positive shard
size.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from qwen2q.convert import DEFAULT_SHARD_BYTES
from qwen2q.errors import Qwen2qError
from qwen2q.qconfig import DEFAULT_SKIP, QuantConfig


@dataclasses.dataclass
class Report:
    """What a conversion did.  Sizes in bytes; `bits_per_weight` counts every stored tensor of the
    quantized linears (codes, scales, zeros, statistics) over their weights."""

    dst: Path
    method: str  # e.g. "awq g128 (gptq rounding)", "nf4 + AWQ scales", "int8"
    seconds: float
    bytes_before: int
    bytes_after: int
    quantized_weights: int
    quantized_bytes: int
    peak_rss_bytes: int
    shards: int
    calibration: str | None = None  # where the calibration tokens came from, when calibrated
    peak_device_bytes: int | None = None  # CUDA only
    alphas: list | None = None  # the scale search's chosen exponents per layer, when calibrated

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)


def as_recipe(recipe: QuantConfig | str) -> QuantConfig:
    if isinstance(recipe, QuantConfig):
        return recipe
    if isinstance(recipe, str):
        return QuantConfig(recipe)
    raise Qwen2qError(f"recipe must be a QuantConfig or a method name, not {type(recipe).__name__}")


def calibrates(recipe: QuantConfig, calibration) -> bool:
    """Whether this recipe runs the layer-wise calibrated pipeline."""
    return recipe.method == "awq" or calibration is not None


def check(recipe: QuantConfig, calibration, max_shard_bytes: int, allow_non_finite: bool) -> None:
    """Refuse, before any work, a combination that would fail later or be silently ignored."""
    if max_shard_bytes <= 0:
        raise Qwen2qError(f"the largest shard must be a positive size, not {max_shard_bytes} bytes")
    if calibration is not None and recipe.method not in ("awq", "nf4"):
        raise Qwen2qError(f"calibration goes with --method awq or nf4 (AWQ scales), not {recipe.method}")
    if calibrates(recipe, calibration):
        extra = [s for s in recipe.skip if s not in DEFAULT_SKIP]
        if extra:
            raise Qwen2qError(f"--skip is not supported with calibrated --method {recipe.method} yet")
        if allow_non_finite:
            raise Qwen2qError(f"--allow-non-finite does not go with calibrated --method {recipe.method}: "
                              "calibration needs finite weights")


def quantize(src, dst, recipe: QuantConfig | str, calibration=None, *, device: str = "cpu", force: bool = False,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES, allow_pickle: bool = False, allow_non_finite: bool = False,
             progress: bool = True) -> Report:
    """Quantize checkpoint directory `src` into the new directory `dst` by `recipe`; return the Report.

    calibration: a `qwen2q.calibrate.pipeline.CalibrationSettings` (method "awq" uses the defaults when
    None; with method "nf4" it adds AWQ's scale search).  force: replace `dst` if it is a checkpoint
    qwen2q wrote.  Raises `Qwen2qError` (one line) for anything the user can fix.
    """
    recipe = as_recipe(recipe)
    check(recipe, calibration, max_shard_bytes, allow_non_finite)
    dst = Path(dst)
    if calibrates(recipe, calibration):
        from qwen2q.calibrate.pipeline import CalibrationSettings, awq_convert

        settings = calibration or CalibrationSettings()
        done, details = awq_convert(src, dst, recipe, settings, device=device, force=force,
                                    max_shard_bytes=max_shard_bytes, progress=progress, allow_pickle=allow_pickle)
        extra = {"calibration": details["calibration"], "peak_device_bytes": details["peak_device_bytes"],
                 "alphas": details["alphas"]}
    else:
        from qwen2q.convert import convert
        from qwen2q.devices import parse_device

        parse_device(device)  # checked even where unused, so a typo is never silently accepted
        done = convert(src, dst, recipe, force=force, max_shard_bytes=max_shard_bytes, progress=progress,
                       allow_pickle=allow_pickle, allow_non_finite=allow_non_finite)
        extra = {}
    return Report(dst=dst, method=describe(recipe, calibration), seconds=done.seconds, bytes_before=done.bytes_before,
                  bytes_after=done.bytes_after, quantized_weights=done.quantized_weights,
                  quantized_bytes=done.quantized_bytes, peak_rss_bytes=done.peak_rss_bytes, shards=done.shards, **extra)


def describe(recipe: QuantConfig, calibration) -> str:
    """The method as a person reads it: "awq g128 (gptq rounding, act order)", "nf4 + AWQ scales", "int8"."""
    label = recipe.method
    if "group_size" in recipe.params:
        label += f" g{recipe.params['group_size']}"
    if recipe.method == "nf4" and calibration is not None:
        label += " + AWQ scales"
    if recipe.method == "awq":
        rounding = (calibration.rounding if calibration is not None else None) or "gptq"
        act_order = calibration is not None and calibration.act_order
        label += f" ({rounding} rounding{', act order' if act_order else ''})"
    return label

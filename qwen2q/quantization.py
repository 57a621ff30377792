"""`qwen2q.quantize(src, dst, recipe, calibration=None, ...) -> Report`: the one library entry point for
writing a quantized checkpoint, and its one pipeline; the CLI only parses options into these arguments
and renders the report.

The recipe (`qwen2q.recipe.Recipe`, or a `QuantConfig` / method name as shorthand: "nf4", "int8",
"int4", "awq") gives each decoder linear a format and an algorithm.  The pipeline checks everything
first (options, the source's tensors and values, the plan against the model's linears, the
destination), writes the tensors outside the decoder layers, then goes through the layers in order:

- no rule calibrates (round-to-nearest): each layer's tensors stream from the memory-mapped source
  into their formats one at a time, no forward pass, no fp32 copy (the fast path);
- some rule calibrates: every layer is loaded, calibrated and quantized (`qwen2q.calibrate.pipeline`),
  and its quantized output feeds the next.

Both write through `qwen2q.writer.CheckpointWriter` (nothing the user owns is replaced or lost) and end
with config.json: the recipe's `quantization_config` and a `qwen2q` note of how the file was made.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from qwen2q._version import __version__
from qwen2q.architecture import HEAD, LINEAR_WEIGHT, head_is_separate, layer_prefix, shape_of, \
    quantizable_linears
from qwen2q.checkpoint import TensorIndex, check_all_finite, check_model_dir, validate_checkpoint, weight_files
from qwen2q.config import Qwen2Config
from qwen2q.destination import check_destination
from qwen2q.errors import OverBudget, Qwen2qError
from qwen2q.model_card import quantized_card
from qwen2q.qconfig import QuantConfig
from qwen2q.qlinear import quantize_linear
from qwen2q.recipe import DEFAULT_SKIP, Recipe
from qwen2q.validate import check_finite
from qwen2q.writer import DEFAULT_SHARD_BYTES, CheckpointWriter, peak_rss_bytes


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
    holdout_kl: float | None = None  # KL against the source on held-out calibration windows, when asked for
    holdout_kl_bound: float | None = None  # its one-sided 95% upper bound over windows (`sensitivity.upper_bound`)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)


def as_recipe(recipe: Recipe | QuantConfig | str, calibration=None) -> tuple[Recipe, QuantConfig | None]:
    """(the recipe, the method shorthand it came from or None)."""
    if isinstance(recipe, Recipe):
        return recipe, None
    if isinstance(recipe, str):
        recipe = QuantConfig(recipe)
    if not isinstance(recipe, QuantConfig):
        raise Qwen2qError(f"recipe must be a Recipe, a QuantConfig or a method name, not {type(recipe).__name__}")
    awq_scales = recipe.method == "nf4" and calibration is not None
    rounding, act_order = (calibration.rounding, calibration.act_order) if calibration is not None else (None, False)
    return recipe.recipe(rounding, act_order, awq_scales), recipe


def check(recipe: Recipe | QuantConfig, calibration, max_shard_bytes: int, allow_non_finite: bool) -> None:
    """Refuse, before any work, a combination of options that would fail later or be silently ignored."""
    from qwen2q.calibrate.pipeline import COMPUTE_DTYPES

    if max_shard_bytes <= 0:
        raise Qwen2qError(f"the largest shard must be a positive size, not {max_shard_bytes} bytes")
    if isinstance(recipe, QuantConfig):
        method = recipe.method
        if calibration is not None and method not in ("awq", "nf4"):
            raise Qwen2qError(f"calibration goes with --method awq or nf4 (AWQ scales), not {method}")
        if calibration is not None and calibration.rounding not in (None, "nearest", "gptq"):
            raise Qwen2qError(f"rounding must be 'gptq' or 'nearest', not {calibration.rounding!r}")
        if method == "nf4" and calibration is not None and calibration.rounding not in (None, "nearest"):
            raise Qwen2qError("NF4 with AWQ scales rounds to nearest: --rounding gptq is for --method awq only")
        if calibration is not None and calibration.act_order and calibration.rounding not in (None, "gptq"):
            raise Qwen2qError("--act-order orders GPTQ's column sweep: it goes with --rounding gptq only")
        recipe, _ = as_recipe(recipe, calibration)
    elif calibration is not None and (calibration.rounding is not None or calibration.act_order):
        raise Qwen2qError("with a Recipe, each rule's algorithm says how it rounds: leave the calibration "
                          "settings' rounding and act_order unset")
    if recipe.calibrated:
        if allow_non_finite:
            raise Qwen2qError("--allow-non-finite does not go with calibration: calibration needs finite weights")
        if calibration is not None and calibration.compute_dtype not in ("auto", *COMPUTE_DTYPES):
            raise Qwen2qError(f"calibration compute dtype must be one of auto, {', '.join(COMPUTE_DTYPES)}, "
                              f"not {calibration.compute_dtype!r}")
    elif calibration is not None:
        raise Qwen2qError("calibration settings were given, but no rule of the recipe calibrates")


def read_source(src, allow_pickle: bool = False, allow_non_finite: bool = False
                ) -> tuple[Path, Qwen2Config, list[Path]]:
    """Check that `src` is an unquantized checkpoint whose tensors' names, shapes and dtypes match its
    config.json (file headers) and whose values are finite (unless `allow_non_finite`), all before any
    work starts; return its path, config and weight files (pickle `pytorch_model*.bin` files only with
    `allow_pickle`: reading them can run code)."""
    src = check_model_dir(src)
    config = Qwen2Config.from_file(src / "config.json")
    if config.quantization_config:
        raise Qwen2qError(f"{src} is already quantized ({config.quantization_config.get('quant_method')}); "
                          "give a bf16/fp16/fp32 checkpoint")
    files = weight_files(src, allow_pickle=allow_pickle)
    validate_checkpoint(src, config, files)
    if not allow_non_finite:
        check_all_finite(files)
    return src, config, files


def check_plan(recipe: Recipe, config: Qwen2Config) -> None:
    """Refuse, before any work, a skip entry or rule that matches no linear, a recipe that would quantize
    nothing, and a linear its format cannot hold (naming it, with the --skip that avoids it)."""
    recipe.check_plan(quantizable_linears(config))
    for name in quantizable_linears(config):
        chosen = recipe.format_for(name)
        if chosen is None:
            continue
        out_features, in_features, _ = shape_of(config, name)
        try:
            chosen[0].check_shape(out_features, in_features, chosen[1])
        except ValueError as e:
            raise Qwen2qError(f"{name}.weight: {e} (or keep it in full precision with --skip "
                              f"{name.rsplit('.', 1)[-1]})") from None


def passthrough(name: str, tensor: torch.Tensor, recipe: Recipe, config: Qwen2Config,
                allow_non_finite: bool = False) -> dict:
    """How a tensor that is not quantized is stored: as it is, a tied lm_head not at all, and the bias of a
    quantized linear in its format's bias dtype (AWQ's WQLinear_GEMM keeps it fp16).  `read_source` has
    proved every stored value finite (unless `allow_non_finite`), so only that cast can add NaN/Inf: a cast
    tensor is checked again, unless `allow_non_finite`."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return {}
    out = tensor.clone()
    owner = recipe.format_for(name[: -len(".bias")]) if name.endswith(".bias") and \
        LINEAR_WEIGHT.match(name[: -len(".bias")] + ".weight") else None
    if owner is not None and owner[0].bias_dtype is not None:
        out = tensor.to(owner[0].bias_dtype)
        if not allow_non_finite:
            check_finite(name, out, tensor)
    return {name: out}


def quantized_config(config: Qwen2Config, recipe: Recipe, shorthand: QuantConfig | None, src: Path, **note) -> dict:
    """config.json for the output: the source's, plus quantization_config and a note of how it was made."""
    cfg = config.to_dict()
    cfg["quantization_config"] = recipe.to_hf(quantizable_linears(config))
    if shorthand is not None:
        made = {"method": shorthand.method, "source": src.name, "group_size": shorthand.params.get("group_size") or None}
        if shorthand.layout != "native":
            made["format"] = shorthand.layout
    else:
        made = {"method": "recipe", "source": src.name,
                "rules": [{"pattern": r.pattern, "format": r.format, "params": dict(r.params), "algorithm": r.algorithm}
                          for r in recipe.rules]}
    cfg["qwen2q"] = {"version": __version__, **made, **note}
    return cfg


def with_source_dtype(recipe: Recipe, config: Qwen2Config) -> Recipe:
    """Peers compute in the checkpoint's dtype: record it as the bitsandbytes compute dtype."""
    if config.dtype in ("bfloat16", "float16", "float32"):
        return dataclasses.replace(recipe, compute_dtype=config.dtype)
    return recipe


def _rtn_layer(index: TensorIndex, i: int, recipe: Recipe, config: Qwen2Config,
               allow_non_finite: bool) -> tuple[dict, int, int]:
    """Layer i's checkpoint tensors by round-to-nearest, streamed one source tensor at a time; returns
    (tensors, quantized weights, their stored bytes)."""
    out, q_elems, q_bytes = {}, 0, 0
    prefix = layer_prefix(i)
    for name in [n for n in index.names() if n.startswith(prefix)]:
        tensor = index.get(name)
        if LINEAR_WEIGHT.match(name) and recipe.format_for(name[: -len(".weight")]) is not None:
            tensors = quantize_linear(recipe, name[: -len(".weight")], tensor)
            q_elems += tensor.numel()
            q_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        else:
            tensors = passthrough(name, tensor, recipe, config, allow_non_finite)
        out.update(tensors)
    return out, q_elems, q_bytes


def quantize(src, dst, recipe: Recipe | QuantConfig | str, calibration=None, *, device: str = "cpu",
             force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, allow_pickle: bool = False,
             allow_non_finite: bool = False, progress: bool = True, made: dict | None = None,
             extras: dict[str, str] | None = None) -> Report:
    """Quantize checkpoint directory `src` into the new directory `dst` by `recipe`; return the Report.

    calibration: a `qwen2q.calibrate.pipeline.CalibrationSettings` for recipes that calibrate (the
    defaults when None; with method "nf4" it adds AWQ's scale search).  force: replace `dst` if it is a
    checkpoint qwen2q wrote.  made: what config.json's `qwen2q` note records of how the file was made, in
    place of the recipe's rules (`qwen2q.mixed` names its budget); extras: {file name: text} written beside
    the weights.  Raises `Qwen2qError` (one line) for anything the user can fix; `OverBudget` when the held-out KL's
    upper bound exceeds `calibration.max_holdout_kl` (nothing is installed).
    """
    from tqdm import tqdm

    from qwen2q.devices import parse_device

    if not isinstance(recipe, (Recipe, QuantConfig, str)):
        as_recipe(recipe)  # raises, naming the type
    check(QuantConfig(recipe) if isinstance(recipe, str) else recipe, calibration, max_shard_bytes, allow_non_finite)
    plan, shorthand = as_recipe(recipe, calibration)
    device = parse_device(device)  # checked even where unused, so a typo is never silently accepted
    src, config, files = read_source(src, allow_pickle=allow_pickle, allow_non_finite=allow_non_finite)
    dst = Path(dst)
    check_plan(plan, config)
    plan = with_source_dtype(plan, config)
    check_destination(src, dst, force)  # before tokenizing and calibrating, not after
    start = time.perf_counter()
    note, calibrator = {}, None
    if plan.calibrated:
        from qwen2q.calibrate.pipeline import CalibrationSettings, LayerCalibrator, calibration_ids, resolve_compute_dtype

        settings = calibration or CalibrationSettings()
        settings = dataclasses.replace(settings, compute_dtype=resolve_compute_dtype(settings.compute_dtype, device))
        ids, described = calibration_ids(src, settings)
        note = _calibration_note(plan, shorthand, settings, described)
    index = TensorIndex(files)
    with CheckpointWriter(src, dst, force, max_shard_bytes) as out:
        head_choice = plan.choice_for(HEAD) if head_is_separate(config) else None  # a quantized lm_head
        for name in index.names():
            if not name.startswith("model.layers.") and not (head_choice is not None and name == HEAD + ".weight"):
                out.add(passthrough(name, index.get(name), plan, config, allow_non_finite))
        if plan.calibrated:
            calibrator = LayerCalibrator(index, config, plan.choice_for, settings, ids, device,
                                         index.get("model.embed_tokens.weight").dtype)
        index.release()
        q_elems = q_bytes = 0
        label = made.get("label", made["method"]) if made else describe(plan, shorthand)
        for i in tqdm(range(config.num_hidden_layers), desc=f"quantize {label}", unit="layer", disable=not progress,
                      leave=False):  # cleared when done: the report follows
            if calibrator is not None:
                tensors, elems, size = calibrator.layer(i)
            else:
                tensors, elems, size = _rtn_layer(index, i, plan, config, allow_non_finite)
            out.add(tensors)
            index.release()  # unmap what this layer read, so RSS does not grow layer by layer
            q_elems, q_bytes = q_elems + elems, q_bytes + size
        if head_choice is not None:  # after the last layer: GPTQ reads the final norm's output
            if calibrator is not None:
                tensors, elems, size = calibrator.head(head_choice)
            else:
                tensors = quantize_linear(plan, HEAD, index.get(HEAD + ".weight"))
                elems, size = config.vocab_size * config.hidden_size, sum(t.numel() * t.element_size()
                                                                         for t in tensors.values())
            out.add(tensors)
            index.release()
            q_elems, q_bytes = q_elems + elems, q_bytes + size
        if calibrator is not None and settings.holdout:
            from qwen2q.calibrate.sensitivity import upper_bound

            kls = calibrator.holdout_kls()
            note["holdout_kl"], note["holdout_kl_bound"] = sum(kls) / len(kls), upper_bound(kls)
            if settings.max_holdout_kl is not None and note["holdout_kl_bound"] > settings.max_holdout_kl:
                raise OverBudget(note["holdout_kl"], note["holdout_kl_bound"],
                                 settings.max_holdout_kl)  # the partial output is discarded
        written = quantized_config(config, plan, shorthand, src, **note)
        if made is not None:
            written["qwen2q"] = {"version": __version__, **{k: v for k, v in made.items() if k != "label"},
                                 "source": src.name, **note}
        shards = out.finish(written, card=_card(out.source_card(), src, plan, label, config, q_bytes, q_elems),
                            extras=extras)
    extra = {}
    if calibrator is not None:
        extra = {"calibration": note["calibration"], "alphas": calibrator.alphas, "holdout_kl": note.get("holdout_kl"),
                 "holdout_kl_bound": note.get("holdout_kl_bound"),
                 "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    return Report(dst=dst, method=label, seconds=time.perf_counter() - start,
                  bytes_before=sum(f.stat().st_size for f in files),
                  bytes_after=sum(f.stat().st_size for f in weight_files(dst)),
                  quantized_weights=q_elems, quantized_bytes=q_bytes, peak_rss_bytes=peak_rss_bytes(),
                  shards=shards, **extra)


def _card(source_card: str | None, src: Path, plan: Recipe, label: str, config: Qwen2Config,
          q_bytes: int, q_elems: int) -> str:
    """The output's model card (`qwen2q.model_card`); `label`: how it was made, in words."""
    formats = {plan.format_for(n)[0] for n in quantizable_linears(config) if plan.format_for(n) is not None}
    loads_in = next(iter(formats)).loaded_by if len(formats) == 1 else \
        "qwen2q (several formats in one checkpoint: no other tool reads that layout yet)"
    return quantized_card(source_card, src.name, label, 8 * q_bytes / max(q_elems, 1), loads_in, __version__,
                          head_quantized=head_is_separate(config) and plan.format_for(HEAD) is not None)


def _calibration_note(plan: Recipe, shorthand: QuantConfig | None, settings, described: str) -> dict:
    """What config.json's `qwen2q` note records of a calibrated run."""
    note = {"calibration": described, "search_tokens": settings.search_tokens, "compute_dtype": settings.compute_dtype}
    algorithms = {r.algorithm for r in plan.rules}
    if shorthand is not None and shorthand.method == "nf4":
        note["awq_scales"] = True
    elif shorthand is not None:
        rounding = "gptq" if algorithms & {"awq-gptq", "awq-gptq-act-order"} else "nearest"
        note["rounding"] = rounding
        if rounding == "gptq":
            note["act_order"] = "awq-gptq-act-order" in algorithms
    return note


def describe(recipe: Recipe, shorthand: QuantConfig | None = None) -> str:
    """The recipe as a person reads it: "awq g128 (gptq rounding, act order)", "nf4 + AWQ scales", "int8",
    or each rule's "pattern: format algorithm" for a general recipe."""
    if shorthand is None:
        return "; ".join(f"{r.pattern}: {r.format} {r.algorithm}" for r in recipe.rules)
    label = shorthand.method
    params = recipe.rules[0].params
    if params.get("group_size"):
        label += f" g{params['group_size']}"
    if shorthand.layout != "native":
        label += f" ({shorthand.layout})"
    algorithm = recipe.rules[0].algorithm
    if algorithm == "awq-scales":
        label += " + AWQ scales"
    elif shorthand.method == "awq":
        label += " (gptq rounding, act order)" if algorithm == "awq-gptq-act-order" else \
            " (gptq rounding)" if algorithm == "awq-gptq" else " (nearest rounding)"
    return label


__all__ = ["DEFAULT_SHARD_BYTES", "DEFAULT_SKIP", "Report", "check", "quantize"]

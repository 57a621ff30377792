"""A quantization recipe: ordered rules that give each decoder linear a format and an algorithm.

    Recipe(rules=(Rule("*.mlp.down_proj", "bnb-int8"),
                  Rule("*", "awq-gemm", {"group_size": 128}, "awq")),
           skip=("lm_head", "model.layers.0"))

The first rule whose pattern matches a linear's full name (e.g. "model.layers.3.mlp.down_proj") decides
it; a linear no rule matches, or one `skip` names, stays in full precision.  lm_head takes a format only
from a rule whose pattern is exactly "lm_head" (and only when `skip` does not name it, as it does by
default): `qwen2q.mixed` writes such rules; globs never reach it.  A pattern is an fnmatch
glob ("*.mlp.*", "model.layers.1?.*") or, like a skip entry, a module name, a dotted suffix of one
("down_proj", "mlp.down_proj") or a prefix ("model.layers.3").

Algorithms (`ALGORITHMS`), each parameterised by the format's grid (`qwen2q.quantizers.format`):
  rtn         round to nearest, streamed tensor by tensor (no calibration)
  awq         AWQ's scale search, clip search, round to nearest (AutoAWQ's algorithm)
  awq-gptq    AWQ's scale search, then GPTQ's error-compensating rounding (qwen2q's default for awq)
  awq-scales  AWQ's scale search, then round to nearest (no clip search)
  gptq        GPTQ's rounding alone
`--method` is shorthand for a one-rule recipe (`QuantConfig.recipe`).

config.json: a recipe that gives every quantized linear one format (with one set of parameters) writes
exactly that format's own `quantization_config` (transformers, AutoAWQ and vLLM read it).  One whose
linears are all compressed-tensors, with several parameter sets (int4 g32 here, int8 there), writes one
compressed-tensors config with a config group per set, listing its modules by name (vLLM reads it).  Any
other recipe with several formats writes {"quant_method": "qwen2q-mixed", "groups": [{"format", "config", "modules"}, ...],
"modules_to_not_convert": [...]}, listing every quantized module by name; only qwen2q reads it, and the
loader builds each module from the group that lists it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any

from qwen2q.architecture import HEAD
from qwen2q.config import MIXED
from qwen2q.errors import Qwen2qError
from qwen2q.quantizers import registry
from qwen2q.quantizers.format import Format

DEFAULT_SKIP = ("lm_head",)
COMPRESSED_TENSORS = "ct-pack"  # the format whose config holds several groups itself (vLLM reads it)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What runs before a linear is stored: AWQ's scale search, its clip search, and how the weights are
    rounded ("nearest", or "gptq" error feedback, optionally in act order)."""

    scale_search: bool = False
    clip_search: bool = False
    rounding: str = "nearest"
    act_order: bool = False

    @property
    def calibrated(self) -> bool:
        return self.scale_search or self.clip_search or self.rounding == "gptq"


ALGORITHMS = {
    "rtn": Algorithm(),
    "awq": Algorithm(scale_search=True, clip_search=True),
    "awq-gptq": Algorithm(scale_search=True, rounding="gptq"),
    "awq-gptq-act-order": Algorithm(scale_search=True, rounding="gptq", act_order=True),
    "awq-scales": Algorithm(scale_search=True),
    "gptq": Algorithm(rounding="gptq"),
    "gptq-act-order": Algorithm(rounding="gptq", act_order=True),
}


def matches(module_name: str, pattern: str) -> bool:
    """Whether `pattern` names `module_name`: exactly, as a dotted suffix or prefix, as an fnmatch glob, or
    (compressed-tensors' form) "re:REGEX" matching from the name's start."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module_name) is not None
    return (module_name == pattern or module_name.endswith("." + pattern) or module_name.startswith(pattern + ".")
            or (any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(module_name, pattern)))


@dataclasses.dataclass(frozen=True)
class Rule:
    """Linears matching `pattern` take `format` (a registered name) with `params` (checked against the
    format's; missing ones take its defaults) and `algorithm` (a name of ALGORITHMS)."""

    pattern: str
    format: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    algorithm: str = "rtn"

    def __post_init__(self):
        try:
            fmt = registry.get(self.format)
            object.__setattr__(self, "params", fmt.params(**dict(self.params)))
        except ValueError as e:
            raise Qwen2qError(f"rule {self.pattern!r}: {e}") from None
        if self.algorithm not in ALGORITHMS:
            raise Qwen2qError(f"rule {self.pattern!r}: unknown algorithm {self.algorithm!r}; "
                              f"choose one of {', '.join(ALGORITHMS)}")
        algorithm = ALGORITHMS[self.algorithm]
        if algorithm.rounding == "gptq" and fmt.grid(self.params, 0) is None:  # a format has a grid or not, whatever the size
            raise Qwen2qError(f"rule {self.pattern!r}: {self.format} offers no grid for GPTQ rounding; "
                              f"use algorithm {'awq' if algorithm.scale_search else 'rtn'} or a format with one")

    @property
    def fmt(self) -> Format:
        return registry.get(self.format)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a recipe gives one linear."""

    format: Format
    params: dict[str, Any]
    algorithm: Algorithm


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Ordered rules (first match wins) and skip entries (kept in full precision whatever the rules say);
    `compute_dtype` is recorded in the config of the bitsandbytes formats."""

    rules: tuple[Rule, ...]
    skip: tuple[str, ...] = DEFAULT_SKIP
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        if not self.rules:
            raise Qwen2qError("a recipe needs at least one rule")

    def rule_for(self, module_name: str) -> Rule | None:
        if any(matches(module_name, s) for s in self.skip):
            return None
        if module_name == HEAD:  # only a rule that names it exactly: no glob reaches the output projection
            return next((r for r in self.rules if r.pattern == HEAD), None)
        return next((r for r in self.rules if matches(module_name, r.pattern)), None)

    def choice_for(self, module_name: str) -> Choice | None:
        """The format, parameters and algorithm of linear `module_name` (a decoder linear's full name, or
        "lm_head"); None: full precision."""
        rule = self.rule_for(module_name)
        return None if rule is None else Choice(rule.fmt, dict(rule.params), ALGORITHMS[rule.algorithm])

    def format_for(self, module_name: str) -> tuple[Format, dict[str, Any]] | None:
        """(format, parameters) of decoder linear `module_name`, or None when it stays in full precision."""
        rule = self.rule_for(module_name)
        return None if rule is None else (rule.fmt, dict(rule.params))

    def skips(self, module_name: str) -> bool:
        return self.rule_for(module_name) is None

    @property
    def calibrated(self) -> bool:
        """Whether any rule's algorithm needs calibration data (then every layer runs the layer-wise path)."""
        return any(ALGORITHMS[r.algorithm].calibrated for r in self.rules)

    def check_plan(self, linears: Iterable[str]) -> None:
        """Refuse a skip entry or rule that matches none of the model's decoder `linears` (a typo, most
        likely), and a recipe that quantizes nothing."""
        names = list(linears)
        example = names[0].rsplit(".", 1)[-1] if names else "down_proj"
        for entry in self.skip:
            if entry not in DEFAULT_SKIP and not any(matches(n, entry) for n in names):
                raise Qwen2qError(f"--skip {entry} matches no linear of this model (give a module name or suffix "
                                  f"such as {example} or mlp.{example}, or a prefix such as model.layers.0)")
        for rule in self.rules:
            if not any(matches(n, rule.pattern) for n in names):
                raise Qwen2qError(f"rule {rule.pattern!r} matches no linear of this model (e.g. {names[0]})"
                                  if names else f"rule {rule.pattern!r}: the model has no decoder linears")
        if all(self.skips(n) for n in names):
            raise Qwen2qError("--skip leaves no linear to quantize; the output would be the source in a new format")

    def to_hf(self, linears: Iterable[str]) -> dict[str, Any]:
        """The config.json `quantization_config` for a model whose decoder linears are `linears`."""
        groups: dict[tuple, list[str]] = {}
        unmatched = []  # no rule names it and no skip entry: full precision, which the config must say
        for name in linears:
            rule = self.rule_for(name)
            if rule is not None:
                groups.setdefault((rule.format, tuple(sorted(rule.params.items()))), []).append(name)
            elif not any(matches(name, s) for s in self.skip):
                unmatched.append(name)
        skip = sorted(set(self.skip)) + unmatched
        if len(groups) > 1 and {fmt for fmt, _ in groups} == {COMPRESSED_TENSORS}:  # one config, a group each
            return registry.get(COMPRESSED_TENSORS).groups_to_config(
                [(dict(params), names) for (_, params), names in groups.items()], skip)
        if len(groups) <= 1:
            rule = next((r for r in self.rules if (r.format, tuple(sorted(r.params.items()))) in groups),
                        self.rules[0])
            return rule.fmt.to_config(rule.params, skip, self.compute_dtype)
        return {"quant_method": MIXED, "modules_to_not_convert": skip,
                "groups": [{"format": fmt, "config": registry.get(fmt).to_config(dict(params), skip, self.compute_dtype),
                            "modules": names} for (fmt, params), names in groups.items()]}

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "Recipe":
        """The recipe a checkpoint's `quantization_config` describes (qwen2q's, transformers + bitsandbytes',
        AutoAWQ's, or qwen2q's mixed form): the loader builds each module from it."""
        if d.get("quant_method") == MIXED:
            return _mixed_from_hf(d)
        fmt = registry.for_config(d)
        if fmt is None:
            raise Qwen2qError(f"quantization method {d.get('quant_method')!r} is not supported; qwen2q reads "
                              f"{', '.join(registry.names())}")
        try:
            if fmt.name == COMPRESSED_TENSORS and len(d.get("config_groups") or {}) > 1:
                return _compressed_tensors_groups(fmt, d)
            params, skip, compute_dtype = fmt.from_config(d)
        except ValueError as e:
            raise Qwen2qError(str(e)) from None
        return cls((Rule("*", fmt.name, params),), skip=tuple(skip), compute_dtype=compute_dtype)


def _compressed_tensors_groups(fmt: Format, d: Mapping[str, Any]) -> Recipe:
    """A rule per target of each config group; class targets ("Linear") last, as compressed-tensors lets a
    module's name take precedence over its class."""
    groups, skip = fmt.groups_from_config(d)
    named = [Rule(t, fmt.name, params) for params, targets in groups for t in targets if t != "Linear"]
    by_class = [Rule("*", fmt.name, params) for params, targets in groups for t in targets if t == "Linear"]
    return Recipe(tuple(named + by_class), skip=tuple(skip))


RECIPE_KEYS = {"rules", "skip"}
RULE_KEYS = {"pattern", "format", "params", "algorithm"}


def read_recipe(path) -> Recipe:
    """A recipe from a JSON file (`qwen2q quantize --recipe FILE`):

        {"rules": [{"pattern": "*.mlp.down_proj", "format": "bnb-int8"},
                   {"pattern": "*", "format": "awq-gemm", "params": {"group_size": 128}, "algorithm": "awq-gptq"}],
         "skip": ["model.layers.0"]}

    "params" and "algorithm" (default "rtn") are optional; "skip" adds to lm_head, which is always kept.
    Qwen2qError naming the file and the entry for anything else."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Qwen2qError(f"--recipe {path}: cannot read it as JSON ({e})") from None
    if not isinstance(d, dict) or set(d) - RECIPE_KEYS or not isinstance(d.get("rules"), list):
        raise Qwen2qError(f"--recipe {path}: expected an object with a 'rules' list (and optionally 'skip'); "
                          f"got {type(d).__name__}" + (f" with {sorted(d)}" if isinstance(d, dict) else ""))
    rules = []
    for i, r in enumerate(d["rules"]):
        if not isinstance(r, dict) or set(r) - RULE_KEYS or not isinstance(r.get("pattern"), str) \
                or not isinstance(r.get("format"), str) or not isinstance(r.get("params", {}), dict) \
                or not isinstance(r.get("algorithm", "rtn"), str):
            raise Qwen2qError(f"--recipe {path}: rule {i} must be an object with 'pattern' and 'format' strings, "
                              f"optional 'params' object and 'algorithm' string; got {r!r}")
        try:
            rules.append(Rule(r["pattern"], r["format"], r.get("params", {}), r.get("algorithm", "rtn")))
        except Qwen2qError as e:
            raise Qwen2qError(f"--recipe {path}: {e}") from None
    skip = d.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise Qwen2qError(f"--recipe {path}: 'skip' must be a list of module names")
    try:
        return Recipe(tuple(rules), skip=tuple(dict.fromkeys((*DEFAULT_SKIP, *skip))))
    except Qwen2qError as e:
        raise Qwen2qError(f"--recipe {path}: {e}") from None


def _mixed_from_hf(d: Mapping[str, Any]) -> Recipe:
    groups = d.get("groups")
    if not isinstance(groups, list) or not groups:
        raise Qwen2qError(f"quantization_config ({MIXED}) has no 'groups' list")
    rules, compute_dtype = [], "bfloat16"
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("modules"), list) \
                or not isinstance(group.get("config"), dict):
            raise Qwen2qError(f"quantization_config ({MIXED}) group {i} needs 'format', 'config' and 'modules'")
        fmt = registry.for_config(group["config"])
        if fmt is None or fmt.name != group.get("format"):
            raise Qwen2qError(f"quantization_config ({MIXED}) group {i}: format {group.get('format')!r} "
                              "is not one qwen2q reads, or its config is not that format's")
        try:
            params, _, compute_dtype = fmt.from_config(group["config"])
        except ValueError as e:
            raise Qwen2qError(f"quantization_config ({MIXED}) group {i}: {e}") from None
        for module in group["modules"]:
            if not isinstance(module, str) or any(c in module for c in "*?["):
                raise Qwen2qError(f"quantization_config ({MIXED}) group {i}: {module!r} is not a module name")
            rules.append(Rule(module, fmt.name, params))
    skip = tuple(s for s in d.get("modules_to_not_convert") or () if isinstance(s, str))
    return Recipe(tuple(rules), skip=skip or DEFAULT_SKIP, compute_dtype=compute_dtype)

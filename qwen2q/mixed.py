"""Mixed precision to a quality budget: the smallest checkpoint whose KL against the source stays under a
number the user gives (`--kl-budget`), or the least KL at a given size (`--target-bits`).

1. Profile (once per model, reusable with `--profile`): for every module group that must share a format
   (`GROUPS`: q/k/v, o, gate/up, down of each layer; vLLM fuses q/k/v and gate/up) and every option
   (`--choices`: int4 per channel or in groups of 128/64/32, int8, nf4, bf16), the predicted KL increase when that group alone
   takes that option (`qwen2q.calibrate.sensitivity`) and its stored size.  A uniform trial per kind of
   group and option (that kind in every layer so, on `KIND_TRIAL_WINDOWS` held-out windows) measures what
   the predictions of that kind add up to, and scales them (`Profile.correction`).  lm_head, when it is
   not the embedding table and the layout is compressed-tensors (unless `keep_head`), is one more group:
   its KL alone is measured, not estimated (GPTQ alone: no op before it but the final norm to fold AWQ's
   scales into), and it is quantized after the last layer (`LayerCalibrator.head`).  On
   Qwen2.5-Coder-0.5B it holds 28% of the weights, and int8 costs it a KL of ~0.0002.
2. Allocate: the assignment of least size whose predicted KL (the sum over groups) is under the budget,
   or of least predicted KL within the size (`qwen2q.calibrate.allocate`), exact and deterministic.
3. Trial (`--kl-budget` only): make the assignment the cheap way (GPTQ alone, no AWQ scale search, on
   `TRIAL_SAMPLES` samples; nothing written) and measure its KL against the source on `HOLDOUT`
   held-out windows: of the calibration text after its samples, or of `--kl-data`, the text the budget
   must hold on.  The budget is checked against the mean's one-sided 95% upper bound over those
   windows (KL varies from window to window, and the budget is about the text, not these 16 windows of
   it).  Over `TRIAL_AIM` x the budget: the predictions are scaled by bound / predicted, the allocation
   is solved again with no group allowed to go down, and the trial is re-made (at most `ATTEMPTS` times).
   The predictions add up each group's error alone; a mixed assignment measured 1.24x its prediction on
   Qwen2.5-Coder-0.5B (the groups the allocation moves down are those whose predictions are lowest), so
   it is the trial, not the prediction, that is trusted.
4. Quantize the assignment (a recipe with a rule per linear: AWQ + GPTQ for int4, GPTQ for int8, AWQ
   scales for NF4) and measure the result's KL on the same held-out windows before anything is
   installed.  Over budget (rare after a passing trial): corrected and re-allocated as in step 3, and
   quantized again.

Output: compressed-tensors (default; config groups per format, bf16 groups in "ignore", so vLLM and
qwen2q load it) or qwen2q's own mixed layout (`layout="native"`: AutoAWQ / bitsandbytes tensors, the only
one that takes nf4).  Beside the weights, `qwen2q_mixed.json` records the profile, the assignment and
the predicted KL; config.json's `qwen2q` note records the budget and the measured KL.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qwen2q._version import __version__
from qwen2q.architecture import HEAD, LINEARS, head_is_separate, layer_prefix, linear_shapes, shape_of
from qwen2q.errors import OverBudget, Qwen2qError
from qwen2q.quantizers import registry
from qwen2q.recipe import ALGORITHMS, DEFAULT_SKIP, Choice, Recipe, Rule

GROUPS = {"attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn.o": ("self_attn.o_proj",),
          "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down": ("mlp.down_proj",)}
OPTIONS = ("int4-ch", "int4-g128", "int4-g64", "int4-g32", "int8", "nf4", "bf16")
DEFAULT_CHOICES = ("int4-g128", "int4-g32", "int8", "bf16")
LAYOUTS = ("compressed-tensors", "native")
PROFILE_FILE = "qwen2q_mixed.json"
PROFILE_VERSION = 1
ATTEMPTS = 4  # quantize-and-measure rounds before giving up
FIRST_AIM = 0.9  # each allocation aims at this fraction of the KL budget (the predictions are estimates)
HOLDOUT = 16  # held-out calibration windows the result's KL is measured on
KIND_TRIAL_WINDOWS = 8  # the first of them, that the profile's uniform trial of each kind and option runs on
PROFILE_TOKENS = 16384  # calibration tokens (spread over the samples) whose statistics the choices' errors use
TRIAL_SAMPLES = 32  # calibration samples (spread over them) the trial pass's GPTQ statistics use
# a trial passes when its bound is within this fraction of the budget.  The final pass (AWQ + GPTQ on 4x the
# samples) has measured below its trial every time, on the same windows (Qwen2.5-Coder-0.5B, 95% bounds:
# 0.01855 -> 0.01661, 0.00181 -> 0.00174), so a trial within the budget goes on to the final pass, which
# still checks the budget itself; a second trial costs ~40% of a final pass.
TRIAL_AIM = 1.0
TRIAL_ALGORITHM = {"awq-gptq": "gptq", "awq-scales": "rtn", "gptq": "gptq"}  # final pass's -> trial's


def option_rule(option: str, layout: str) -> tuple[str, dict, str] | None:
    """(format, params, algorithm) of `option` in `layout`; None for bf16 (kept as the source stores it)."""
    if option == "bf16":
        return None
    if option == "int4-ch":  # one scale and zero per output row: the smallest int4 (~4.02 bits at K = 896)
        if layout == "compressed-tensors":
            return "ct-pack", {"bits": 4, "group_size": 0, "symmetric": False}, "awq-gptq"
        raise Qwen2qError("int4-ch has no native form (AutoAWQ's layout takes groups): drop it from --choices, or "
                          "write --format compressed-tensors")
    if option.startswith("int4-g"):
        group = int(option[len("int4-g"):])
        if layout == "compressed-tensors":  # AWQ's asymmetric grid, written as W4A16 pack-quantized
            return "ct-pack", {"bits": 4, "group_size": group, "symmetric": False}, "awq-gptq"
        return "awq-gemm", {"group_size": group}, "awq-gptq"
    if option == "int8":
        if layout == "compressed-tensors":
            return "ct-pack", {"bits": 8, "group_size": 0, "symmetric": True}, "gptq"
        return "bnb-int8", {}, "gptq"
    if option == "nf4":
        if layout == "compressed-tensors":
            raise Qwen2qError("nf4 has no compressed-tensors form: drop it from --choices, or write --format native "
                              "(which only qwen2q reads)")
        return "bnb-nf4", {}, "awq-scales"
    raise Qwen2qError(f"unknown choice {option!r}; choose from {', '.join(OPTIONS)}")


def parse_choices(text: str | Sequence[str], layout: str) -> tuple[str, ...]:
    """The options of "--choices int4-g128,int8,bf16" (or a sequence), checked against `layout`, in the
    order given; at least one."""
    items = [c.strip() for c in (text.split(",") if isinstance(text, str) else text) if c.strip()]
    if not items:
        raise Qwen2qError(f"--choices names no option; choose from {', '.join(OPTIONS)}")
    if len(set(items)) != len(items):
        raise Qwen2qError(f"--choices names an option twice: {','.join(items)}")
    for item in items:
        option_rule(item, layout)  # raises for an unknown one, or nf4 in compressed-tensors
    return tuple(items)


def choice_of(option: str, layout: str) -> Choice | None:
    rule = option_rule(option, layout)
    if rule is None:
        return None
    fmt, params, algorithm = rule
    return Choice(registry.get(fmt), registry.get(fmt).params(**params), ALGORITHMS[algorithm])


def stored_bytes(option: str, layout: str, out_features: int, in_features: int, source_bytes: int) -> int | None:
    """Bytes one linear [out, in] stores as `option` (biases aside); None when its format cannot hold it."""
    rule = option_rule(option, layout)
    if rule is None:
        return out_features * in_features * source_bytes
    fmt = registry.get(rule[0])
    try:
        specs = fmt.stored_tensors("w", out_features, in_features, fmt.params(**rule[1]))
    except ValueError:
        return None
    total = 0
    for spec in specs.values():
        if spec.shapes is not None:
            total += int(torch.Size(spec.shapes[0]).numel()) * torch.empty((), dtype=spec.dtypes[0]).element_size()
    return total


@dataclasses.dataclass
class Profile:
    """What step 1 measured: per linear, each option's predicted KL and stored bytes."""

    model: dict[str, Any]  # the source's shape, to refuse a profile of another model
    calibration: str
    choices: tuple[str, ...]
    layout: str
    kl: dict[str, dict[str, float]]  # {linear full name: {option: predicted KL}}
    size: dict[str, dict[str, int]]  # {linear full name: {option: bytes}}
    seconds: float
    # the uniform trials, {kind (a `GROUPS` key; "all", every linear, in profiles of earlier versions):
    # {option: measured KL of the model with that kind's linears in every layer so}}
    uniform: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def correction(self, option: str, kind: str = "all") -> float:
        """measured / predicted KL of the uniform trial of `option` on the linears of `kind` (a `GROUPS` key),
        or on every linear for a profile without per-kind trials (1.0 without either): the factor that kind's
        predictions are scaled by.  It takes in what the estimate leaves out (the Fisher's off-diagonal,
        errors compounding across layers) at the scale of a whole model, and per kind, since the estimate
        misjudges kinds by different factors (on Qwen2.5-Coder-0.5B, q/k/v's KL fell far less than predicted)."""
        if kind not in self.uniform:
            if kind == HEAD:
                return 1.0
            kind = "all"
        measured = self.uniform.get(kind, {}).get(option)
        members = set(GROUPS[kind]) if kind in GROUPS else {HEAD} if kind == HEAD else None
        predicted = sum(row[option] for name, row in self.kl.items()
                        if option in row and (_linear(name) in members if members is not None else name != HEAD))
        return measured / predicted if measured is not None and predicted > 0 else 1.0

    def group_table(self, layers: int, head: bool = False) -> tuple[list[str], list[list[float]], list[list[float]]]:
        """(group names "model.layers.3.mlp.down", then "lm_head" when `head`; sizes [groups][choices],
        predicted KL [groups][choices], each option's scaled by its `correction`); an option a group's format
        cannot hold is NaN (never chosen)."""
        names, sizes, kls = [], [], []
        groups = [(layer_prefix(i) + group, group, [layer_prefix(i) + m for m in members])
                  for i in range(layers) for group, members in GROUPS.items()] + ([(HEAD, HEAD, [HEAD])] if head else [])
        for name, group, full in groups:
            names.append(name)
            sizes.append([sum(self.size[n][c] for n in full) if all(self.size[n].get(c) is not None for n in full)
                          else float("nan") for c in self.choices])
            kls.append([self.correction(c, group) * sum(self.kl[n][c] for n in full) if all(c in self.kl[n] for n in full)
                        else float("nan") for c in self.choices])
        return names, sizes, kls

    def to_dict(self) -> dict:
        return {"version": PROFILE_VERSION, "qwen2q": __version__, "model": self.model, "calibration": self.calibration,
                "choices": list(self.choices), "layout": self.layout, "seconds": self.seconds,
                "predicted_kl": self.kl, "bytes": self.size, "uniform_measured_kl_by_kind": self.uniform,
                "correction": {k: {c: self.correction(c, k) for c in self.choices} for k in self.uniform}}

    def merged(self, other: "Profile", choices: Sequence[str]) -> "Profile":
        """This profile with `other`'s options added (both of one model, calibration and layout), holding
        `choices`; the seconds add up."""
        return dataclasses.replace(
            self, choices=tuple(choices), seconds=self.seconds + other.seconds,
            kl={n: {**self.kl.get(n, {}), **other.kl.get(n, {})} for n in dict.fromkeys([*self.kl, *other.kl])},
            size={n: {**self.size.get(n, {}), **other.size.get(n, {})} for n in dict.fromkeys([*self.size, *other.size])},
            uniform={k: {**self.uniform.get(k, {}), **other.uniform.get(k, {})}
                     for k in dict.fromkeys([*self.uniform, *other.uniform])})

    @classmethod
    def read(cls, path, model: dict, choices: Sequence[str], layout: str, partial: bool = False) -> "Profile":
        """A profile saved by an earlier run (its output's qwen2q_mixed.json, or that file's copy), checked to
        be of this model, with every option of `choices` (partial: those of them it holds, at least one) and
        the same layout."""
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE_FILE
        try:
            d = json.loads(path.read_text())
            profile = d["profile"] if "profile" in d else d
            if profile.get("version") != PROFILE_VERSION:
                raise ValueError(f"profile version {profile.get('version')}, this qwen2q reads {PROFILE_VERSION}")
            kl, size = profile["predicted_kl"], profile["bytes"]
            got = cls(profile["model"], profile["calibration"], tuple(profile["choices"]), profile["layout"],
                      {n: {c: float(v) for c, v in row.items()} for n, row in kl.items()},
                      {n: {c: (None if v is None else int(v)) for c, v in row.items()} for n, row in size.items()},
                      float(profile["seconds"]), _uniform_trials(profile))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise Qwen2qError(f"--profile {path}: not a qwen2q mixed-precision profile ({e})") from None
        if got.model != model:
            raise Qwen2qError(f"--profile {path} was measured on another model ({got.model.get('name')}, "
                              f"{got.model.get('layers')} layers); measure this one without --profile")
        held = tuple(c for c in choices if c in got.choices)
        if got.layout != layout or not held or (len(held) < len(choices) and not partial):
            raise Qwen2qError(f"--profile {path} holds {','.join(got.choices)} in {got.layout}; this run needs "
                              f"{','.join(choices)} in {layout}: measure again without --profile")
        return dataclasses.replace(got, choices=held)


@dataclasses.dataclass
class Attempt:
    """One measured make of an assignment: a "trial" (GPTQ alone, `TRIAL_SAMPLES`, nothing written) or the
    "final" pass."""

    predicted_kl: float
    measured_kl: float | None  # mean over the held-out windows
    bits_per_weight: float
    seconds: float
    kind: str = "final"
    kl_bound: float | None = None  # its one-sided 95% upper bound, what the budget is checked against


@dataclasses.dataclass
class MixedReport:
    """What a mixed-precision run did.  `report`: the final conversion's (`qwen2q.quantization.Report`);
    `assignment`: {group name (or "lm_head"): option}; `bits_per_weight`: stored bytes of every linear the
    search chose for (decoder linears, and lm_head when it is a group; bf16 ones included) over their weights."""

    report: Any
    budget: str  # "kl <= 0.02" or "4.50 bits per weight"
    assignment: dict[str, str]
    predicted_kl: float
    measured_kl: float
    kl_bound: float  # measured_kl's one-sided 95% upper bound over the held-out windows
    bits_per_weight: float
    attempts: list[Attempt]
    profile_seconds: float  # 0 when the profile was read from a file
    seconds: float

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for option in self.assignment.values():
            out[option] = out.get(option, 0) + 1
        return out


def _linear(name: str) -> str:
    """"self_attn.q_proj" for "model.layers.3.self_attn.q_proj"; "lm_head" for itself."""
    return name if name == HEAD else name.split(".", 3)[3]


def _uniform_trials(profile: Mapping) -> dict[str, dict[str, float]]:
    """A saved profile's uniform trials, {kind: {option: KL}}; one kind "all" from an earlier qwen2q's
    per-option trials ("uniform_measured_kl": {option: KL})."""
    if "uniform_measured_kl_by_kind" in profile:
        return {k: {c: float(v) for c, v in row.items()} for k, row in profile["uniform_measured_kl_by_kind"].items()}
    old = {c: float(v) for c, v in profile.get("uniform_measured_kl", {}).items()}
    return {"all": old} if old else {}


def model_key(src: Path, config) -> dict:
    return {"name": src.name, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size}


def measure_profile(src: Path, config, files, choices, layout, settings, device, progress: bool,
                    linears: bool = True, head: bool = False) -> Profile:
    """Step 1: the Fisher pass, then every option's error, layer by layer (`qwen2q.calibrate.sensitivity`),
    for the decoder linears (`linears`) and lm_head (`head`: measured, not estimated; one forward pass
    when it is all that is asked for)."""
    from tqdm import tqdm

    from qwen2q.calibrate.pipeline import calibration_ids
    from qwen2q.calibrate.sensitivity import choice_errors, fisher_samples, output_fisher
    from qwen2q.checkpoint import TensorIndex

    start = time.perf_counter()
    ids, described = calibration_ids(src, settings)
    n = ids.shape[0] - settings.holdout  # the held-out windows: only ever measured on, never fitted to
    index = TensorIndex(files)
    layers = config.num_hidden_layers
    bar = tqdm(total=(3 if linears else 1) * layers, desc="profile" if linears else "profile lm_head", unit="layer",
               disable=not progress, leave=False)
    try:
        fisher = {}
        if linears:
            fisher_ids = ids[fisher_samples(n, ids.shape[1], settings.search_tokens)]
            fisher = output_fisher(index, config, fisher_ids, device, settings.compute_dtype, progress=bar.update)
        options = {layer_prefix(i) + name: {c: choice_of(c, layout) for c in choices} if linears else {}
                   for i in range(layers) for name in LINEARS}
        error_ids = ids[fisher_samples(n, ids.shape[1], PROFILE_TOKENS)]
        kl, uniform = choice_errors(index, config, error_ids, device, options, fisher, settings.compute_dtype,
                                    progress=bar.update, held=ids[n:n + KIND_TRIAL_WINDOWS], kinds=GROUPS,
                                    head_options={c: head_choice(c, layout) for c in choices} if head else None)
    finally:
        bar.close()
        index.release()
    source_bytes = index.get("model.embed_tokens.weight").element_size()
    names = ([layer_prefix(i) + name for i in range(layers) for name in LINEARS] if linears else []) + ([HEAD] if head else [])
    size = {name: {c: stored_bytes(c, layout, *shape_of(config, name)[:2], source_bytes) for c in choices} for name in names}
    kl = {name: row for name, row in kl.items() if name in size}
    uniform = {kind: row for kind, row in uniform.items() if row}
    return Profile(model_key(src, config), described, tuple(choices), layout, kl, size, time.perf_counter() - start,
                   uniform)


def head_choice(option: str, layout: str) -> Choice | None:
    """What lm_head takes as `option`: the option's format, rounded by GPTQ alone (no op before it but the
    final norm to fold AWQ's scales into); None for bf16."""
    choice = choice_of(option, layout)
    return None if choice is None else dataclasses.replace(choice, algorithm=ALGORITHMS["gptq"])


def recipe_for(assignment: Mapping[str, str], layout: str) -> Recipe:
    """A rule per quantized linear (its full name), bf16 groups' linears in `skip`; lm_head (when the
    assignment names it) by GPTQ alone (`head_choice`), kept in full precision otherwise."""
    rules, keep = [], []
    head = assignment.get(HEAD)
    head_rule = None if head is None else option_rule(head, layout)
    if head_rule is not None:
        rules.append(Rule(HEAD, head_rule[0], head_rule[1], "gptq"))
    for group, option in assignment.items():
        if group == HEAD:
            continue
        prefix, kind = group.rsplit(".", 2)[0], ".".join(group.rsplit(".", 2)[1:])
        for member in GROUPS[kind]:
            name = f"{prefix}.{member}"
            rule = option_rule(option, layout)
            if rule is None:
                keep.append(name)
            else:
                rules.append(Rule(name, rule[0], rule[1], rule[2]))
    if not rules:
        raise Qwen2qError("the budget leaves every module in bf16: nothing to quantize (raise the budget)")
    return Recipe(tuple(rules), skip=(*(DEFAULT_SKIP if head_rule is None else ()), *keep))


def trial_recipe(recipe: Recipe) -> Recipe:
    """The trial pass's recipe: each rule's format, rounded by GPTQ alone (no AWQ search) or, for a format
    that AWQ only scales (nf4), to nearest."""
    return dataclasses.replace(recipe, rules=tuple(dataclasses.replace(r, algorithm=TRIAL_ALGORITHM[r.algorithm])
                                                   for r in recipe.rules))


def trial_kl(src: Path, config, files, recipe: Recipe, settings, device, progress: bool) -> tuple[float, float]:
    """(mean KL, its 95% upper bound) against the source, on `settings.holdout` held-out windows, of the model made by
    `trial_recipe(recipe)` from `TRIAL_SAMPLES` calibration samples spread over `settings.samples`, layer by
    layer as the final pass goes (each quantized layer's output feeds the next); nothing is written."""
    from tqdm import tqdm

    from qwen2q.calibrate.pipeline import LayerCalibrator, calibration_ids
    from qwen2q.calibrate.sensitivity import fisher_samples, upper_bound
    from qwen2q.checkpoint import TensorIndex

    ids, _ = calibration_ids(src, settings)
    n = ids.shape[0] - settings.holdout
    picked = fisher_samples(n, ids.shape[1], TRIAL_SAMPLES * ids.shape[1])
    trial_ids = torch.cat([ids[picked], ids[n:]])
    run = dataclasses.replace(settings, ids=trial_ids, samples=len(picked), max_holdout_kl=None)
    plan = trial_recipe(recipe)
    index = TensorIndex(files)
    try:
        calibrator = LayerCalibrator(index, config, plan.choice_for, run, trial_ids, device,
                                     index.get("model.embed_tokens.weight").dtype)
        index.release()
        for i in tqdm(range(config.num_hidden_layers), desc="trial", unit="layer", disable=not progress, leave=False):
            calibrator.layer(i)
            index.release()
        if plan.choice_for(HEAD) is not None:
            calibrator.head(plan.choice_for(HEAD))
        kls = calibrator.holdout_kls()
        return sum(kls) / len(kls), upper_bound(kls)
    finally:
        index.release()


def quantize_mixed(src, dst, *, kl_budget: float | None = None, target_bits: float | None = None,
                   choices: str | Sequence[str] = DEFAULT_CHOICES, layout: str = "compressed-tensors",
                   calibration=None, kl_data=None, profile=None, keep_head: bool = False, device: str = "cpu",
                   force: bool = False,
                   max_shard_bytes: int | None = None, allow_pickle: bool = False, progress: bool = True,
                   log=print) -> MixedReport:
    """Quantize checkpoint `src` into `dst` with a format per module group: the smallest under `kl_budget`
    (mean KL against the source per token, its 95% upper bound over the held-out windows), or the least
    predicted KL at `target_bits` bits per decoder-linear weight.  calibration: `CalibrationSettings`
    (samples, text, search tokens: AWQ's; rounding and act order are the options'); kl_data: the text (file, folder or hub
    id) the budget holds on, whose first `HOLDOUT` windows the KL is measured on (None: held-out windows of
    the calibration text after its samples); profile: a previous run's output directory or its
    qwen2q_mixed.json, to skip step 1 (what it lacks is measured and added).  lm_head joins the search
    as one more group when it is not the embedding table and the layout is compressed-tensors, unless
    `keep_head`.  log(line) reports each step."""
    from qwen2q.calibrate.allocate import allocate, totals
    from qwen2q.calibrate.pipeline import COMPUTE_DTYPES, CalibrationSettings, resolve_compute_dtype
    from qwen2q.destination import check_destination
    from qwen2q.devices import parse_device
    from qwen2q.quantization import quantize, read_source
    from qwen2q.writer import DEFAULT_SHARD_BYTES

    start = time.perf_counter()
    if (kl_budget is None) == (target_bits is None):
        raise Qwen2qError("give one of --kl-budget and --target-bits")
    if kl_budget is not None and not (0 < kl_budget < float("inf")):
        raise Qwen2qError(f"--kl-budget must be a positive number, not {kl_budget}")
    if layout not in LAYOUTS:
        raise Qwen2qError(f"unknown output format {layout!r}; choose one of {', '.join(LAYOUTS)}")
    choices = parse_choices(choices, layout)
    settings = calibration or CalibrationSettings()
    if settings.rounding is not None or settings.act_order:
        raise Qwen2qError("--rounding and --act-order do not go with mixed precision: each choice has its own "
                          "algorithm (int4: AWQ + GPTQ, int8: GPTQ, nf4: AWQ scales)")
    settings = dataclasses.replace(settings, holdout=settings.holdout or HOLDOUT,
                                   holdout_source=kl_data if kl_data is not None else settings.holdout_source)
    device = parse_device(device)
    settings = dataclasses.replace(settings, compute_dtype=resolve_compute_dtype(settings.compute_dtype, device))
    if settings.compute_dtype not in COMPUTE_DTYPES:
        raise Qwen2qError(f"calibration compute dtype must be one of auto, {', '.join(COMPUTE_DTYPES)}, "
                          f"not {settings.compute_dtype!r}")
    src, config, files = read_source(src, allow_pickle=allow_pickle)
    dst = Path(dst)
    check_destination(src, dst, force)
    key = model_key(src, config)
    head = head_is_separate(config) and layout == "compressed-tensors" and not keep_head
    if profile is not None:
        prof = Profile.read(profile, key, choices, layout, partial=True)
        profile_seconds = 0.0
        log(f"profile: read {profile} (measured in {prof.seconds:.0f} s)")
        missing = [c for c in choices if c not in prof.choices]
        if missing:  # measured now on the profile's own calibration, and added to it
            _same_calibration(src, settings, prof, profile, f"lacks {','.join(missing)}")
            extra = measure_profile(src, config, files, missing, layout, settings, device, progress, head=head)
            prof, profile_seconds = prof.merged(extra, choices), extra.seconds
            log(f"profile: {','.join(missing)} measured in {extra.seconds:.0f} s and added")
        head_missing = [c for c in choices if c not in prof.kl.get(HEAD, {})] if head else []
        if head_missing:  # a profile measured before lm_head joined the search, or with --keep-lm-head
            _same_calibration(src, settings, prof, profile, "has no lm_head measurements")
            extra = measure_profile(src, config, files, head_missing, layout, settings, device, progress,
                                    linears=False, head=True)
            prof, profile_seconds = prof.merged(extra, choices), profile_seconds + extra.seconds
            log(f"profile: lm_head as {','.join(head_missing)} measured in {extra.seconds:.0f} s and added")
    else:
        prof = measure_profile(src, config, files, choices, layout, settings, device, progress, head=head)
        profile_seconds = prof.seconds
        log(f"profile: {len(prof.kl)} linears x {len(choices)} choices in {prof.seconds:.0f} s")
    for kind, row in prof.uniform.items():
        log(f"profile: uniform trials of {'every linear' if kind == 'all' else kind}: " + ", ".join(
            f"{c} KL {row[c]:.5f} (x{prof.correction(c, kind):.2f} the prediction)" for c in choices if c in row))
    names, sizes, kls = prof.group_table(config.num_hidden_layers, head)
    order = sorted(range(len(choices)), key=lambda k: _mean_size(sizes, k))  # smallest first: "up" = larger
    choices = tuple(choices[k] for k in order)
    sizes = [[row[k] for k in order] for row in sizes]
    kls = [[row[k] for k in order] for row in kls]
    weights = sum(o * i for o, i, _ in linear_shapes(config).values()) * config.num_hidden_layers + \
        (config.vocab_size * config.hidden_size if head else 0)
    if target_bits is not None:
        least, most = (8 * sum(min(_finite(r)) for r in sizes) / weights, 8 * sum(max(_finite(r)) for r in sizes) / weights)
        if not least <= target_bits:
            raise Qwen2qError(f"--target-bits {target_bits} is below the smallest these choices allow ({least:.3f})")
        if target_bits > most:
            raise Qwen2qError(f"--target-bits {target_bits} is above the largest these choices allow ({most:.3f})")
        budget_text = f"{target_bits:.3f} bits per weight"
    else:
        budget_text = f"KL <= {kl_budget:g}"
    correction, floor, attempts = 1.0, None, []
    trial_settings = None  # the calibration and held-out tokens, read once for every trial
    for attempt in range(1, ATTEMPTS + 1):
        scaled = [[v * correction for v in row] for row in kls]
        if target_bits is not None:
            pick = allocate(sizes, scaled, target_bits * weights / 8, by="size", floor=floor)
        else:
            pick = allocate(sizes, scaled, kl_budget * FIRST_AIM, by="kl", floor=floor)
        size, predicted = totals(sizes, kls, pick)
        assignment = {n: choices[k] for n, k in zip(names, pick)}
        bits = 8 * size / weights
        log(f"attempt {attempt}: {_counts(assignment)}{f' (lm_head {assignment[HEAD]})' if head else ''}; "
            f"{bits:.3f} bits per weight, predicted KL {predicted:.5f}"
            + (f" (x{correction:.2f} measured correction)" if correction != 1.0 else ""))
        recipe = recipe_for(assignment, layout)

        def over(measured: float) -> None:  # the next allocation: predictions scaled up, no group moving down
            nonlocal correction, floor
            correction *= max(measured / max(predicted * correction, 1e-12), 1.05)
            floor = pick

        if kl_budget is not None:
            began = time.perf_counter()
            if trial_settings is None:
                from qwen2q.calibrate.pipeline import calibration_ids

                trial_settings = dataclasses.replace(settings, ids=calibration_ids(src, settings)[0])
            trial, bound = trial_kl(src, config, files, recipe, trial_settings, device, progress)
            attempts.append(Attempt(predicted, trial, bits, time.perf_counter() - began, "trial", bound))
            log(f"attempt {attempt}: trial (GPTQ alone, {TRIAL_SAMPLES} samples) measured KL {trial:.5f} "
                f"(95% bound {bound:.5f}) in {attempts[-1].seconds:.0f} s")
            if bound > kl_budget * TRIAL_AIM:
                aim = f"{TRIAL_AIM:g} x {kl_budget:g}" if TRIAL_AIM != 1 else f"the budget {kl_budget:g}"
                log(f"attempt {attempt}: trial's bound over {aim}: moving the worst groups up")
                over(bound)
                continue
        run = dataclasses.replace(settings, max_holdout_kl=kl_budget)
        made = {"method": "mixed", "label": f"mixed to {budget_text}", "budget": budget_text, "choices": list(choices), "format": layout,
                "predicted_kl": predicted, "attempt": attempt}
        extras = {PROFILE_FILE: json.dumps({"profile": prof.to_dict(), "budget": budget_text,
                                            "predicted_kl": predicted, "bits_per_weight": bits,
                                            "assignment": assignment,
                                            "attempts": [dataclasses.asdict(a) for a in attempts]}, indent=1) + "\n"}
        began = time.perf_counter()
        try:
            report = quantize(src, dst, recipe, run, device=str(device), force=force, allow_pickle=allow_pickle,
                              max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES, progress=progress, made=made,
                              extras=extras)
        except OverBudget as e:
            attempts.append(Attempt(predicted, e.measured, bits, time.perf_counter() - began, "final", e.bound))
            log(f"attempt {attempt}: measured KL {e.measured:.5f}, 95% bound {e.bound:.5f} > {kl_budget:g}: "
                "moving the worst groups up")
            over(e.bound)
            continue
        attempts.append(Attempt(predicted, report.holdout_kl, bits, time.perf_counter() - began, "final",
                                report.holdout_kl_bound))
        log(f"attempt {attempt}: measured KL {report.holdout_kl:.5f} (95% bound {report.holdout_kl_bound:.5f}) on "
            f"{settings.holdout} held-out windows")
        return MixedReport(report, budget_text, assignment, predicted, report.holdout_kl, report.holdout_kl_bound,
                           bits, attempts, profile_seconds, time.perf_counter() - start)
    raise Qwen2qError(f"no result under KL {kl_budget:g} after {ATTEMPTS} attempts (last measured "
                      f"{attempts[-1].measured_kl:.5f}); nothing was written: raise the budget or add a larger choice")


def _same_calibration(src, settings, prof: Profile, profile, lacking: str) -> None:
    """Refuse to add to a profile measured on other calibration text than this run's."""
    from qwen2q.calibrate.pipeline import calibration_ids

    described = calibration_ids(src, settings)[1]
    if described != prof.calibration:
        raise Qwen2qError(f"--profile {profile} {lacking} and was measured on other calibration text "
                          f"({prof.calibration}; this run's: {described}): measure again without --profile")


def _finite(row):
    return [v for v in row if v == v]


def _mean_size(sizes, k) -> float:
    values = [row[k] for row in sizes if row[k] == row[k]]
    return sum(values) / max(len(values), 1)


def _counts(assignment: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for option in assignment.values():
        counts[option] = counts.get(option, 0) + 1
    return ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))

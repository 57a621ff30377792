"""What `qwen2q info` reports about a checkpoint directory, read from config.json and file headers only.

Nothing here imports torch (`qwen2q info` answers in a fraction of a second): weight files and their
safetensors headers come from `qwen2q.files`, the quantization from config.json's `quantization_config`
and the `qwen2q` note a qwen2q-written checkpoint carries.
"""
from __future__ import annotations

from pathlib import Path

from qwen2q.architecture import parameter_count
from qwen2q.config import MIXED, Qwen2Config
from qwen2q.files import check_model_dir, read_safetensors_header, weight_files


def describe_quantization_config(q: dict) -> str:
    """A `quantization_config` in a phrase: "AWQ int4 group 128 (gemm)", "bitsandbytes 4-bit nf4, double
    quant", "bitsandbytes int8 (LLM.int8 storage)", each group of a mixed one, else its quant_method."""
    method = q.get("quant_method")
    if method == MIXED and isinstance(q.get("groups"), list):
        parts = []
        for g in q["groups"]:
            config = g.get("config") if isinstance(g, dict) else None
            phrase = describe_quantization_config(config) if isinstance(config, dict) else str(g)
            modules = g.get("modules") if isinstance(g, dict) else None
            parts.append(f"{phrase} ({len(modules)} linears)" if isinstance(modules, list) else phrase)
        return "mixed: " + "; ".join(parts)
    if method == "awq":
        return f"AWQ int{q.get('bits', 4)} group {q.get('group_size')} ({q.get('version', 'gemm')})"
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            dq = ", double quant" if q.get("bnb_4bit_use_double_quant") else ""
            return f"bitsandbytes 4-bit {q.get('bnb_4bit_quant_type', 'fp4')}{dq}"
        if q.get("load_in_8bit"):
            return "bitsandbytes int8 (LLM.int8 storage)"
    if method == "compressed-tensors" and isinstance(q.get("config_groups"), dict):
        parts = []
        for group in q["config_groups"].values():
            w = group.get("weights") if isinstance(group, dict) else None
            if isinstance(w, dict):
                kind = "symmetric" if w.get("symmetric") else "asymmetric"
                scope = f"group {w.get('group_size')}" if w.get("strategy") == "group" else w.get("strategy")
                parts.append(f"W{w.get('num_bits')}A16 {w.get('type')} {kind}, {scope}")
        return f"compressed-tensors {q.get('format')}: " + "; ".join(parts)
    details = ", ".join(f"{k} {q[k]}" for k in ("format", "bits", "group_size") if k in q)
    return f"{method} ({details})" if details else str(method)


def quantization_summary(c: Qwen2Config) -> str:
    """The checkpoint's quantization in a phrase ("none" when unquantized)."""
    return describe_quantization_config(c.quantization_config) if c.quantization_config else "none"


def recorded_method(c: Qwen2Config) -> str | None:
    """How qwen2q made the checkpoint, from its config.json note: "awq g128, gptq rounding; calibration:
    wiki.utf8: 128 x 512 tokens (qwen2q 0.1.0)"; None for a checkpoint qwen2q did not write."""
    note = c.raw.get("qwen2q")
    if not isinstance(note, dict) or not note.get("method"):
        return None
    text = str(note["method"])
    if note.get("group_size"):
        text += f" g{note['group_size']}"
    if note.get("budget"):
        text += f" to {note['budget']}"
    if note.get("format"):
        text += f" as {note['format']}"
    if note.get("holdout_kl") is not None:
        text += f", KL {note['holdout_kl']:.5f} on held-out windows"
        if note.get("holdout_kl_bound") is not None:
            text += f" (95% bound {note['holdout_kl_bound']:.5f})"
    if note.get("rounding"):
        text += f", {note['rounding']} rounding" + (", act order" if note.get("act_order") else "")
    if note.get("awq_scales"):
        text += " + AWQ scales"
    if note.get("rules"):
        text += ": " + "; ".join(f"{r.get('pattern')} -> {r.get('format')} {r.get('algorithm')}"
                                 for r in note["rules"] if isinstance(r, dict))
    if note.get("calibration"):
        text += f"; calibration: {note['calibration']}"
    if note.get("source"):
        text += f"; from {note['source']}"
    return text + (f" (qwen2q {note['version']})" if note.get("version") else "")


def describe(path: str | Path) -> list[tuple[str, str]]:
    """(field, value) rows describing the checkpoint at `path`.  CheckpointError / Qwen2qError for a
    directory that would not load: no weights, pickle weights only, a truncated or corrupt file, an
    index naming files outside the directory."""
    path = check_model_dir(path)
    c = Qwen2Config.from_file(path / "config.json")
    files = weight_files(path)
    for f in files:
        read_safetensors_header(f)  # refuses a truncated or corrupt file
    size = sum(f.stat().st_size for f in files)
    rope = c.rope.rope_type if c.rope.rope_type == "default" else f"{c.rope.rope_type} x{c.rope.factor:g}"
    rows = [
        ("path", str(path)),
        ("architecture", "Qwen2ForCausalLM"),
        ("parameters", f"{parameter_count(c) / 1e6:,.1f} M"),
        ("layers", str(c.num_hidden_layers)),
        ("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}"),
        ("heads / kv heads / head dim", f"{c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim}"),
        ("vocab", str(c.vocab_size)),
        ("tied embeddings", "yes" if c.tie_word_embeddings else "no"),
        ("rope", f"{rope}, theta {c.rope.theta:g}"),
        ("context", str(c.max_position_embeddings)),
        ("dtype", c.dtype),
        ("quantization", quantization_summary(c)),
    ]
    made = recorded_method(c)
    if made is not None:
        rows.append(("made by", made))
    return rows + [("weight files", str(len(files))), ("size on disk", f"{size / 2**20:,.1f} MiB")]


SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _named(name: str, patterns) -> bool:
    """Whether a module-name pattern (a name, dotted suffix or prefix, or compressed-tensors' "re:REGEX") names
    `name` (`qwen2q.recipe.matches` without importing the formats, so `info` stays torch-free)."""
    import re

    for p in patterns:
        if not isinstance(p, str):
            continue
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p) or name.startswith(p + "."):
            return True
    return False


def _ct_label(w: dict) -> str:
    """"int4-g128" (groups), "int4-ch" (one scale per row: mixed precision's choice) or "int8" (per row)."""
    label = f"int{w.get('num_bits')}"
    if w.get("strategy") == "group":
        return label + f"-g{w.get('group_size')}"
    return label + ("-ch" if w.get("strategy") == "channel" and w.get("num_bits") != 8 else "")


def module_formats(q: dict, names: list[str], kept: str) -> dict[str, str]:
    """{decoder linear name: short format label ("int4-g128", "int8", "nf4", or `kept` for a linear left
    unquantized)} from a `quantization_config`."""
    method = q.get("quant_method")
    out = {}
    if method == MIXED and isinstance(q.get("groups"), list):
        for g in q["groups"]:
            if isinstance(g, dict) and isinstance(g.get("config"), dict):
                label = module_formats(g["config"], [m for m in g.get("modules") or [] if m in names], kept)
                out.update({m: v for m, v in label.items() if v != kept})
        return {n: out.get(n, kept) for n in names}
    if method == "compressed-tensors" and isinstance(q.get("config_groups"), dict):
        ignore = q.get("ignore") or []
        groups = [g for g in q["config_groups"].values() if isinstance(g, dict)]
        for n in names:
            if _named(n, ignore):
                out[n] = kept
                continue
            named = [g for g in groups if _named(n, [t for t in g.get("targets") or [] if t != "Linear"])]
            by_class = [g for g in groups if "Linear" in (g.get("targets") or [])]
            group = (named or by_class or [None])[0]
            out[n] = _ct_label(group.get("weights") or {}) if group else kept
        return out
    skip = q.get("modules_to_not_convert") or q.get("llm_int8_skip_modules") or []
    if method == "awq":
        label = f"int{q.get('bits', 4)}-g{q.get('group_size')}"
    elif method == "bitsandbytes":
        label = q.get("bnb_4bit_quant_type", "fp4") if q.get("load_in_4bit") else "int8"
    else:
        label = str(method)
    return {n: kept if _named(n, skip) else label for n in names}


def module_table(path: str | Path) -> str | None:
    """The format of every decoder linear, a row per run of layers that agree ("0-3  int4-g128 ..."), then
    lm_head's ("lm_head: int8") when it has its own tensor, or None when the checkpoint is unquantized or
    every linear has one format."""
    from qwen2q.architecture import HEAD, LINEAR_NAMES, LINEARS, head_is_separate, layer_prefix
    from qwen2q.evals.table import Column, format_table

    path = check_model_dir(path)
    c = Qwen2Config.from_file(path / "config.json")
    if not c.quantization_config:
        return None
    names = [layer_prefix(i) + n for i in range(c.num_hidden_layers) for n in LINEARS]
    head = [HEAD] if head_is_separate(c) else []
    kept = SHORT_DTYPES.get(c.dtype, c.dtype)
    labels = module_formats(c.quantization_config, names + head, kept)
    if head and c.quantization_config.get("quant_method") != "compressed-tensors":
        labels[HEAD] = kept  # only a compressed-tensors config group may name lm_head (qwen2q's mixed output)
    if len(set(labels.values())) <= 1:
        return None
    rows, start = [], 0
    per_layer = [[labels[layer_prefix(i) + n] for n in LINEARS] for i in range(c.num_hidden_layers)]
    for i in range(1, c.num_hidden_layers + 1):
        if i == c.num_hidden_layers or per_layer[i] != per_layer[start]:
            rows.append(dict(zip(("layers", *LINEAR_NAMES),
                                 (str(start) if i - 1 == start else f"{start}-{i - 1}", *per_layer[start]))))
            start = i
    table = format_table([Column(h.removesuffix("_proj"), h) for h in ("layers", *LINEAR_NAMES)], rows)
    return table + "".join(f"\n{HEAD}: {labels[HEAD]}" for _ in head)

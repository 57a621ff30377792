"""Evaluate checkpoints, alone (perplexity) or against a reference (drift), into report rows.

Used by `qwen2q eval` and `qwen2q demo`.  All models see the same text, tokenized once with the
reference's (or the first model's) tokenizer, cut into the same windows.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from qwen2q._version import __version__
from qwen2q.checkpoint import check_model_dir
from qwen2q.config import Qwen2Config
from qwen2q.errors import Qwen2qError
from qwen2q.evals import table
from qwen2q.evals.data import EvalText
from qwen2q.evals.drift import compare
from qwen2q.evals.logits_cache import CachedLogits
from qwen2q.evals.perplexity import perplexity
from qwen2q.evals.table import Column
from qwen2q.info import quantization_summary
from qwen2q.validate import all_finite


def method_label(path: Path) -> str:
    """A short name for the checkpoint's format: 'bf16', 'nf4', 'int8', 'int4-g128', 'awq-g128', ..."""
    cfg = Qwen2Config.from_file(path / "config.json")
    note = cfg.raw.get("qwen2q") or {}
    if note.get("method"):
        g = note.get("group_size")
        return f"{note['method']}-g{g}" if g else note["method"]
    if cfg.quantization_config:
        return quantization_summary(cfg)
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(cfg.dtype, cfg.dtype)


def weights_size(path: Path) -> int:
    from qwen2q.checkpoint import weight_files

    return sum(f.stat().st_size for f in weight_files(path))


def choose_seq_len(requested: int | None, config: Qwen2Config) -> int:
    limit = config.max_position_embeddings
    seq_len = min(requested or 2048, limit)
    if seq_len < 2:
        raise Qwen2qError(f"--seq-len must be at least 2, got {requested}")
    return seq_len


def check_same_vocabulary(paths: list[Path]) -> int:
    """All checkpoints score the same token ids, so they need one vocabulary: refuse (before any model is
    loaded) when their config.json vocab_size differ; return the common size."""
    sizes = {p: Qwen2Config.from_file(check_model_dir(p) / "config.json").vocab_size for p in paths}
    first = paths[0]
    for p, size in sizes.items():
        if size != sizes[first]:
            raise Qwen2qError(f"{p} has vocab_size {size} but {first} has {sizes[first]}: models scored on the "
                              "same tokens need the same vocabulary")
    return sizes[first]


class FiniteLogits:
    """`model` (input_ids [B, T] -> logits [B, T, V]) that refuses NaN/Inf logits with a one-line error
    naming the checkpoint and the window; windows are counted from 1 in call order."""

    def __init__(self, model, path: Path, n_windows: int):
        self.model, self.path, self.n_windows, self.done = model, path, n_windows, 0

    def parameters(self):
        return self.model.parameters()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids)
        if not all_finite(logits):
            first, last = self.done + 1, self.done + ids.shape[0]
            which = f"window {first}" if first == last else f"windows {first}-{last}"
            raise Qwen2qError(f"{self.path}: non-finite logits (NaN/Inf) in {which} of {self.n_windows}; "
                              "its weights or activations overflow, so no perplexity can be computed")
        self.done += ids.shape[0]
        return logits


def row_names(paths: list[Path], given: dict[Path, str] | None = None) -> list[str]:
    """How each checkpoint is named in the table: the name the user gave it, else its folder's name, else
    (two folders of one name) the path as given."""
    given = given or {}
    names = [given.get(p) or p.name or str(p) for p in paths]
    clash = {n for n in names if names.count(n) > 1}
    return [str(p) if n in clash and p not in given else n for p, n in zip(paths, names)]


def evaluate(models: list[Path | tuple[str, Path]], text: EvalText, reference: Path | None = None,
             seq_len: int | None = None, max_windows: int | None = None, device: str = "cpu",
             dtype: str | None = None, progress: bool = True, allow_non_finite: bool = False,
             cpu_cache: str | None = None) -> dict:
    """Rows of figures for each model in `models` (a path, or (name, path) to name its row) and the
    reference, plus the settings used.

    All models must share one vocab_size (checked before loading).  Non-finite logits stop the run
    with the model and window named; `allow_non_finite` lets NaN/Inf weights load and `cpu_cache` is passed
    on (see `qwen2q.load`)."""
    import qwen2q

    given = {Path(m[1]): m[0] for m in models if isinstance(m, tuple)}
    models = [Path(m[1]) if isinstance(m, tuple) else Path(m) for m in models]
    names = dict(zip([Path(reference)] if reference else [], ["reference"]))
    names.update(zip(models, row_names(models, given)))
    tok_source = reference or models[0]
    vocab_size = check_same_vocabulary([Path(tok_source)] + [Path(m) for m in models])
    first = qwen2q.load(tok_source, device=device, dtype=dtype, allow_non_finite=allow_non_finite, cpu_cache=cpu_cache)
    seq_len = choose_seq_len(seq_len, first.config)
    ids = torch.tensor(first.tokenizer.encode(text.text), dtype=torch.long)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise Qwen2qError(f"{tok_source}: its tokenizer gives token id {int(ids.max())}, outside vocab_size {vocab_size}")
    if ids.numel() < seq_len:
        raise Qwen2qError(f"{text.name} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    n_windows = ids.numel() // seq_len if max_windows is None else min(max_windows, ids.numel() // seq_len)
    settings = {"dataset": text.name, "source": text.source, "seq_len": seq_len, "windows": n_windows,
                "scored_tokens": n_windows * (seq_len - 1), "device": device, "dtype": str(first.dtype),
                "cpu_cache": cpu_cache, "reference": str(reference) if reference else None, "qwen2q": __version__,
                "torch": torch.__version__, "python": platform.python_version()}
    rows = []
    # The reference runs once per window: its logits are kept (bounded) and replayed in every comparison.
    with CachedLogits(FiniteLogits(first.model, reference, n_windows)) as ref_logits:
        if reference:
            t0 = time.perf_counter()
            with _bar(n_windows, f"eval {Path(reference).name} (reference)", progress) as bar:
                r = perplexity(ref_logits, ids, seq_len, max_windows=n_windows, batch_size=1, progress=bar.update)
            rows.append({"name": names[Path(reference)], "model": str(reference),
                         "method": method_label(Path(reference)), "size_bytes":
                         weights_size(Path(reference)), "ppl": r["ppl"], "seconds": time.perf_counter() - t0})
        for path in models:
            path = Path(path)
            m = first if (reference is None and path == Path(tok_source)) else qwen2q.load(
                path, device=device, dtype=dtype, allow_non_finite=allow_non_finite, cpu_cache=cpu_cache)
            t0 = time.perf_counter()
            with _bar(n_windows, f"eval {path.name}", progress) as bar:
                if reference:
                    d = compare(ref_logits, FiniteLogits(m.model, path, n_windows), ids, seq_len,
                                max_windows=n_windows, progress=bar.update)
                    row = {"ppl": d["ppl"], "ppl_delta": d["ppl_delta"], "ppl_ratio": d["ppl_ratio"], "kl": d["kl"],
                           "top1": d["top1"], "window_kl": d["window_kl"], "window_nll": d["window_nll"],
                           "window_nll_reference": d["window_nll_reference"]}  # for paired comparisons
                else:
                    row = {"ppl": perplexity(FiniteLogits(m.model, path, n_windows), ids, seq_len,
                                             max_windows=n_windows, batch_size=1, progress=bar.update)["ppl"]}
            rows.append({"name": names[path], "model": str(path), "method": method_label(path),
                         "size_bytes": weights_size(path), **row,
                         "seconds": time.perf_counter() - t0})
    return {"settings": settings, "rows": rows}


def _bar(total: int, desc: str, progress: bool):
    """A progress bar over windows, only on a terminal (in a log it is noise and splits an error line),
    cleared when done; closed on errors too."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="window", disable=None if progress else True, leave=False)


COLUMNS = [Column("model", "name"), Column("method", "method"), Column("size MiB", "size_mib", "{:.2f}"), Column("ppl", "ppl", "{:.4f}"),
           Column("delta", "ppl_delta", "{:+.4f}"), Column("KL", "kl", "{:.5f}"), Column("top-1", "top1", "{:.2%}")]
EXTRA_COLUMNS = [Column("bits/w", "bits_per_weight", "{:.3f}"), Column("quant s", "quantize_seconds", "{:.1f}")]


def format_table(result: dict, extra_columns: tuple[str, ...] = ()) -> str:
    """A plain-text table of `result["rows"]` under a line with the settings used; `extra_columns` names
    row keys of EXTRA_COLUMNS to show too."""
    s = result["settings"]
    cols = COLUMNS + [c for c in EXTRA_COLUMNS if c.key in extra_columns]
    windows = f"{s['windows']} window{'s' if s['windows'] != 1 else ''}"
    settings = (f"{s['dataset']} ({s['source']}): seq len {s['seq_len']}, {windows}, "
                f"{s['scored_tokens']} scored tokens, {s['dtype'].replace('torch.', '')} on {s['device']}")
    rows = [{**row, "size_mib": row.get("size_bytes", 0) / 2**20} for row in result["rows"]]
    return settings + "\n" + table.format_table(cols, rows)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict, path: str | Path) -> None:
    """Bar charts of KL and perplexity delta by model (needs matplotlib: pip install qwen2q[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Qwen2qError("--plot needs matplotlib: pip install 'qwen2q[plot]'") from None
    rows = [r for r in result["rows"] if "kl" in r]
    if not rows:
        raise Qwen2qError("--plot needs --reference (it draws drift against the reference)")
    names = [r.get("name", r["method"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, [r["kl"] for r in rows], color="tab:blue")
    axes[0].set_title("mean KL(reference || quantized)")
    axes[1].bar(names, [r["ppl_delta"] for r in rows], color="tab:orange")
    axes[1].set_title("perplexity delta")
    s = result["settings"]
    fig.suptitle(f"{s['dataset']}, seq len {s['seq_len']}, {s['scored_tokens']} tokens", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

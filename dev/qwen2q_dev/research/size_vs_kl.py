"""Size against KL of mixed-precision results and uniform formats, from `qwen2q eval --json` runs (one, or
several of the same text, windows and reference, their rows pooled).

\b
    qwen2q eval mixed-0.01=DIR mixed-0.02=DIR mixed-0.05=DIR nf4=DIR int4=DIR awq=DIR int8=DIR \\
        -r SOURCE --dataset wikitext2 --seq-len 512 --max-windows 128 --json EVAL.json
    python dev size-vs-kl EVAL.json [MORE.json ...] --plot evals/results/size_vs_kl.png [--json OUT]

Rows whose name starts with "mixed" are mixed results ("mixed-lmh*": lm_head in the search, drawn as a
series of their own); the others are uniform points.  Size: the checkpoint's weight files on disk.  The
mixed curve is the frontier of the mixed results (each point smaller, or of lower KL, than every other:
a result both larger and of more KL than another is what no one would choose).  The two questions of
mixed precision, answered on that curve (linear in log KL between its points, not extrapolated):

    at the size of uniform awq:  the mixed KL there, against awq's KL
    at the KL of uniform int8:   the mixed size there, against int8's size
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from qwen2q.cli_options import json_option
from qwen2q.errors import Qwen2qError
from qwen2q.evals.table import Column, format_table

MIB = 2**20


SAME = ("dataset", "source", "seq_len", "windows", "scored_tokens", "reference")  # what pooled runs must share


def read(*paths: Path) -> tuple[dict, list[dict], list[dict]]:
    """(settings, mixed rows sorted by size, uniform rows) of eval JSONs with a reference, pooled; runs that
    scored other text, windows or reference, or two rows of one name, are refused."""
    settings, rows = None, []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
            got = [r for r in result["rows"] if r.get("kl") is not None]
            these = result["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Qwen2qError(f"{path}: not a `qwen2q eval --json` result with a reference ({e})") from None
        if settings is None:
            settings = these
        differ = [k for k in SAME if these.get(k) != settings.get(k)]
        if differ:
            raise Qwen2qError(f"{path}: scored with another {differ[0]} ({these.get(differ[0])!r}, not "
                              f"{settings.get(differ[0])!r}) than {paths[0]}")
        rows += got
    kept: dict[str, dict] = {}
    for r in rows:  # a checkpoint scored again with the same figures (eval is deterministic) is one point
        seen = kept.setdefault(r["name"], r)
        if seen is not r and (seen["size_bytes"] != r["size_bytes"] or not math.isclose(seen["kl"], r["kl"], rel_tol=1e-6)):
            raise Qwen2qError(f"row {r['name']!r} is in more than one result with other figures: name the runs apart "
                              "(NAME=MODEL)")
    rows = list(kept.values())
    mixed = sorted((r for r in rows if r["name"].startswith("mixed")), key=lambda r: r["size_bytes"])
    uniform = [r for r in rows if not r["name"].startswith("mixed")]
    if not mixed:
        raise Qwen2qError(f"{', '.join(map(str, paths))}: no row named mixed*")
    return settings, mixed, uniform


def kl_at_size(mixed: list[dict], size: float) -> float | None:
    """The mixed curve's KL at `size` (log-linear between neighbours), None outside it."""
    for a, b in zip(mixed, mixed[1:]):
        if a["size_bytes"] <= size <= b["size_bytes"]:
            t = (size - a["size_bytes"]) / (b["size_bytes"] - a["size_bytes"])
            return math.exp((1 - t) * math.log(a["kl"]) + t * math.log(b["kl"]))
    return None


def size_at_kl(mixed: list[dict], kl: float) -> float | None:
    """The mixed curve's size at `kl`, None outside it."""
    for a, b in zip(mixed, mixed[1:]):
        lo, hi = sorted((a["kl"], b["kl"]))
        if lo <= kl <= hi:
            t = (math.log(kl) - math.log(a["kl"])) / (math.log(b["kl"]) - math.log(a["kl"]))
            return (1 - t) * a["size_bytes"] + t * b["size_bytes"]
    return None


def frontier(mixed: list[dict]) -> list[dict]:
    """The mixed rows no other row beats in both size and KL, by size (their KL then falls)."""
    out: list[dict] = []
    for r in sorted(mixed, key=lambda r: (r["size_bytes"], r["kl"])):
        if not out or r["kl"] < out[-1]["kl"]:
            out.append(r)
    return out


def claims(mixed: list[dict], uniform: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in uniform}
    mixed = frontier(mixed)
    out = []
    if "awq" in by_name:
        awq = by_name["awq"]
        kl = kl_at_size(mixed, awq["size_bytes"])
        out.append({"question": "KL at the size of uniform awq", "uniform": awq["kl"], "mixed": kl,
                    "holds": kl is not None and kl < awq["kl"]})
    if "int8" in by_name:
        int8 = by_name["int8"]
        size = size_at_kl(mixed, int8["kl"])
        out.append({"question": "MiB at the KL of uniform int8", "uniform": int8["size_bytes"] / MIB,
                    "mixed": None if size is None else size / MIB,
                    "holds": size is not None and size < int8["size_bytes"]})
    return out


def draw(settings: dict, mixed: list[dict], uniform: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = [([r for r in mixed if not r["name"].startswith("mixed-lmh")], "tab:blue",
               "qwen2q mixed, lm_head kept (--kl-budget or --target-bits)"),
              ([r for r in mixed if r["name"].startswith("mixed-lmh")], "tab:green", "qwen2q mixed, lm_head in the search")]
    for rows, color, label in series:
        if rows:
            ax.plot([r["size_bytes"] / MIB for r in rows], [r["kl"] for r in rows], "o-", color=color, label=label)
    front = frontier(mixed)
    ax.plot([r["size_bytes"] / MIB for r in front], [r["kl"] for r in front], ":", color="grey", linewidth=1,
            label="frontier (what the questions read)")
    for r in mixed:
        ax.annotate(r["name"], (r["size_bytes"] / MIB, r["kl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.scatter([r["size_bytes"] / MIB for r in uniform], [r["kl"] for r in uniform], color="tab:red", marker="s",
               label="uniform")
    for r in uniform:
        ax.annotate(r["name"], (r["size_bytes"] / MIB, r["kl"]), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint size (MiB)")
    ax.set_ylabel("mean KL(bf16 || quantized) per token")
    ax.set_title(f"{Path(settings.get('reference') or '').name}: {settings['dataset']}, {settings['windows']} x "
                 f"{settings['seq_len']} tokens", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("size-vs-kl", help=__doc__)
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Draw the PNG here.")
@json_option
def command(results, plot_path, json_out):
    settings, mixed, uniform = read(*map(Path, results))
    rows = [{"name": r["name"], "mib": r["size_bytes"] / MIB, "kl": r["kl"], "ppl": r.get("ppl")} for r in mixed + uniform]
    click.echo(format_table([Column("checkpoint", "name"), Column("MiB", "mib", "{:.1f}"), Column("KL", "kl", "{:.5f}"),
                             Column("ppl", "ppl", "{:.3f}")], rows))
    found = claims(mixed, uniform)
    click.echo(format_table([Column("question", "question"), Column("uniform", "uniform", "{:.5g}"),
                             Column("mixed", "mixed", "{:.5g}"), Column("holds", "holds")], found))
    if plot_path:
        draw(settings, mixed, uniform, Path(plot_path))
    if json_out:
        Path(json_out).write_text(json.dumps({"settings": settings, "rows": rows, "claims": found}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    from qwen2q_dev.cli import run_command

    return run_command(command, argv)

"""Two or more `compare-peers` rows compared window by window: is a perplexity gap larger than its noise?

\b
    python dev paired RESULT.json[:ROW] RESULT.json[:ROW] [...] [--first N] [--json OUT]

Each argument is a `compare-peers --json` or `qwen2q eval --json` file (with a reference), with `:ROW` naming
the row when the file holds more than one quantized row.  Every row must have been scored on the same windows against the same reference (checked:
same text, seq len and window count, and the same per-window reference NLL).  The first row is the baseline;
for each other row B the table gives, from the per-window mean NLLs (`qwen2q.evals.drift.paired_nll_difference`):

\b
    gap      = ppl_B - ppl_A                      (A = the first row)
    95% ci   = ppl_A * (exp(d +- 1.96 se) - 1)   d = mean over windows of nll_B,w - nll_A,w
    KL gap   = KL_B - KL_A, with its own 1.96 se from the per-window KL

`--first N` keeps each row's first N windows and recomputes its perplexity, delta and KL from them (every
window scores the same number of tokens, so these are exactly the figures a run with --max-windows N
gives): a long run then also reports the shorter protocol's figures on the same checkpoints.

A gap whose interval holds 0 is not resolved by these windows.  Adjacent windows of one article are not
independent draws, so the intervals are if anything too narrow.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from qwen2q.cli_options import json_option
from qwen2q.errors import Qwen2qError
from qwen2q.evals.drift import paired_nll_difference
from qwen2q.evals.table import Column, format_table as render_table

Z95 = 1.96


def load_row(spec: str) -> dict:
    """The row `FILE[:ROW]` of a compare_peers JSON, with its file's settings under 'settings'."""
    path, _, name = spec.partition(":")
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise Qwen2qError(f"cannot read {path}: {e}") from None
    # compare-peers rows say their status and name a "row"; `qwen2q eval --json` rows name a "name"
    rows = [{**r, "row": r.get("row", r.get("name"))} for r in result.get("rows", [])
            if r.get("status", "ok") == "ok" and "window_nll" in r]
    if name:
        rows = [r for r in rows if r["row"] == name]
    if len(rows) != 1:
        found = ", ".join(r["row"] for r in rows) or "none with per-window figures"
        raise Qwen2qError(f"{spec}: name one scored row (FILE:ROW); found {found}")
    row = rows[0]
    if "label" not in row:  # an eval row: the figures a compare-peers row also names, from its windows
        n = len(row["window_nll"])
        row = {**row, "label": row["row"], "ppl_reference": math.exp(sum(row["window_nll_reference"]) / n),
               "ppl_delta_se": row["ppl"] * paired_nll_difference(row["window_nll"], row["window_nll_reference"])["se"]}
    return {**row, "settings": result["settings"], "spec": spec}


def first_windows(row: dict, n: int) -> dict:
    """`row` restricted to its first `n` windows, its ppl, delta, se and KL recomputed from them."""
    have = len(row["window_nll"])
    if not 0 < n <= have:
        raise Qwen2qError(f"{row['spec']}: --first {n} is outside its 1..{have} windows")
    cut = {k: row[k][:n] for k in ("window_nll", "window_nll_reference", "window_kl")}
    ppl, ppl_ref = (math.exp(sum(v) / n) for v in (cut["window_nll"], cut["window_nll_reference"]))
    se = paired_nll_difference(cut["window_nll"], cut["window_nll_reference"])["se"]
    settings = {**row["settings"], "windows": n}
    return {**row, **cut, "settings": settings, "ppl": ppl, "ppl_reference": ppl_ref, "ppl_delta": ppl - ppl_ref,
            "ppl_delta_se": ppl * se, "kl": sum(cut["window_kl"]) / n}


def check_same_windows(rows: list[dict]) -> None:
    """Raise unless every row was scored on the same text, windows and reference figures as the first."""
    keys = ("dataset", "seq_len", "windows", "text_tokens")
    first = rows[0]
    for r in rows[1:]:
        differs = [k for k in keys if r["settings"].get(k) != first["settings"].get(k)]
        ref_a, ref_b = first["window_nll_reference"], r["window_nll_reference"]
        if not differs and any(not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(ref_a, ref_b)):
            differs = ["per-window reference NLL"]
        if differs:
            raise Qwen2qError(f"{r['spec']} was not scored like {first['spec']}: {', '.join(differs)} differ")


def compare_rows(rows: list[dict]) -> list[dict]:
    """One dict per row after the first: ppl and KL gaps to the first row with their 95% intervals."""
    check_same_windows(rows)
    base = rows[0]
    out = []
    for r in rows[1:]:
        nll = paired_nll_difference(r["window_nll"], base["window_nll"])
        kl = paired_nll_difference(r["window_kl"], base["window_kl"])  # same statistic: mean and se of a gap
        lo, hi = (base["ppl"] * math.expm1(nll["mean"] + s * Z95 * nll["se"]) for s in (-1, 1))
        out.append({"row": r["label"], "baseline": base["label"], "ppl_gap": r["ppl"] - base["ppl"],
                    "ppl_gap_ci95": [lo, hi], "kl_gap": r["kl"] - base["kl"], "kl_gap_se": kl["se"],
                    "windows": nll["windows"], "resolved": not lo <= 0.0 <= hi})
    return out


ROW_COLUMNS = [Column("row", "label"), Column("ppl", "ppl", "{:.3f}"), Column("delta", "ppl_delta", "{:+.3f}"),
               Column("± se", "ppl_delta_se", "{:.3f}"), Column("KL", "kl", "{:.4f}")]
GAP_COLUMNS = [Column("row", "row"), Column("ppl gap", "ppl_gap", "{:+.3f}"),
               Column("95% ci", "ci", "{}"), Column("by these windows", "verdict"), Column("KL gap", "kl_gap", "{:+.4f}"),
               Column("± 1.96 se", "kl_ci", "{:.4f}")]


def format_table(rows: list[dict], gaps: list[dict]) -> str:
    """The rows' own figures, then each row's gaps to the first with their 95% intervals."""
    s = rows[0]["settings"]
    gap_rows = [{**g, "ci": f"{g['ppl_gap_ci95'][0]:+.3f} .. {g['ppl_gap_ci95'][1]:+.3f}",
                 "verdict": "resolved" if g["resolved"] else "not resolved", "kl_ci": Z95 * g["kl_gap_se"]}
                for g in gaps]
    return "\n".join([f"{s['dataset']}: {s['windows']} windows of {s['seq_len']}, reference ppl {rows[0]['ppl_reference']:.3f}",
                      render_table(ROW_COLUMNS, rows), f"against {rows[0]['label']}:", render_table(GAP_COLUMNS, gap_rows)])


@click.command("paired", help=__doc__)
@click.argument("specs", nargs=-1, required=True, metavar="FILE[:ROW] FILE[:ROW] ...")
@click.option("--first", type=click.IntRange(min=1), default=None, metavar="N", help="Use only each row's first N windows.")
@json_option
def command(specs, first, json_out) -> None:
    if len(specs) < 2:
        raise Qwen2qError("give at least two rows to compare")
    rows = [load_row(spec) for spec in specs]
    if first is not None:
        rows = [first_windows(r, first) for r in rows]
    gaps = compare_rows(rows)
    click.echo(format_table(rows, gaps))
    if json_out:
        Path(json_out).write_text(json.dumps(gaps, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python dev paired ARGV` in this process (see `qwen2q_dev.cli.main`)."""
    from qwen2q_dev.cli import run_command

    return run_command(command, argv)

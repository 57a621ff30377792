"""The one table renderer: alignment, missing values, rows that say why they have no figures."""
import math

from qwen2q.evals.table import Column, format_fields, format_table


def test_columns_align_and_missing_values_print_as_a_dash():
    columns = [Column("model", "model"), Column("ppl", "ppl", "{:.2f}"), Column("kl", "kl", "{:.3f}")]
    text = format_table(columns, [{"model": "bf16", "ppl": 12.3456, "kl": None},
                                  {"model": "awq-g128", "ppl": 13.0, "kl": math.nan},
                                  ("broken", "failed: out of memory")])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "ppl", "kl"]
    assert lines[1].split() == ["bf16", "12.35", "-"] and lines[2].split() == ["awq-g128", "13.00", "-"]
    assert lines[3] == "broken    failed: out of memory"
    assert len({len(line) for line in lines[:3]}) == 1  # right-aligned figures end in one column


def test_fields_align_their_values_after_the_widest_name():
    text = format_fields([("path", "/m"), ("size on disk", "1.0 MiB"), ("empty", "")], indent="  ")
    assert text.splitlines() == ["  path          /m", "  size on disk  1.0 MiB", "  empty"]

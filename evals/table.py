"""The one plain-text table renderer for everything qwen2q and its dev tools print as a table.

    from qwen2q.evals.table import Column, format_fields, format_table
    print(format_table([Column("method", "method"), Column("ppl", "ppl", "{:.4f}")], rows))
    print(format_fields([("size before", "940.0 MiB"), ("size after", "310.2 MiB")]))

The first column is left-aligned, the others right-aligned; each column is as wide as its widest cell;
columns are two spaces apart.  A missing value (None, or a float NaN) prints as "-".  A row given as a
(first cell, text) pair prints its first cell and then the text across the remaining columns: a row
that has no figures, e.g. one that failed, says why in place of them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

GAP = "  "
MISSING = "-"


@dataclasses.dataclass(frozen=True)
class Column:
    """One column: its `header`, the row key it shows, and the format of a present value."""

    header: str
    key: str
    fmt: str = "{}"

    def cell(self, row: Mapping) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        return self.fmt.format(value)


def format_table(columns: list[Column], rows: Iterable[Mapping | tuple[str, str]]) -> str:
    """The header line and one line per row (see the module docstring), joined by newlines."""
    cells = [row if isinstance(row, tuple) else [c.cell(row) for c in columns] for row in rows]
    widths = [len(c.header) for c in columns]
    for line in cells:
        if isinstance(line, tuple):
            widths[0] = max(widths[0], len(line[0]))
        else:
            widths = [max(w, len(text)) for w, text in zip(widths, line)]

    def render(texts: list[str]) -> str:
        first = texts[0].ljust(widths[0])
        return GAP.join([first] + [t.rjust(w) for t, w in zip(texts[1:], widths[1:])]).rstrip()

    lines = [render([c.header for c in columns])]
    for line in cells:
        if isinstance(line, tuple):
            lines.append(f"{line[0].ljust(widths[0])}{GAP}{line[1]}".rstrip())
        else:
            lines.append(render(line))
    return "\n".join(lines)


def format_fields(fields: Iterable[tuple[str, str]], indent: str = "") -> str:
    """(name, value) pairs one per line, the values aligned in one column after the widest name: the
    form of `qwen2q info` and of the quantize report."""
    fields = list(fields)
    width = max((len(name) for name, _ in fields), default=0)
    return "\n".join(f"{indent}{name.ljust(width)}{GAP}{value}".rstrip() for name, value in fields)

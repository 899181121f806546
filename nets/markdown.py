"""The project's one markdown-table writer (bench.report and the CLIs that print tables use it)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table: header row, separator, one line per row (cells str()-ed).

    Raises ValueError naming the row when a row's cell count differs from the header's.
    """
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells; the header has {len(header)}: {list(row)!r}")
    lines = ["| " + " | ".join(str(c) for c in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

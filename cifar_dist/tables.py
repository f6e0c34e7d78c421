"""Markdown tables of pandas frames, without pandas' optional tabulate (the GPU machines lack it)."""
from __future__ import annotations


def format_cell(value) -> str:
    """A number as a table shows it: thousands separated, 2 decimals from 1 up, 4 significant digits below."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value)


def markdown_table(frame, columns: list[str] | None = None) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which the GPU machines lack)."""
    columns = columns or list(frame.columns)
    numeric = [frame[c].dtype.kind in "if" for c in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    for row in frame[columns].itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(v.item() if hasattr(v, "item") else v) for v in row) + " |")
    return "\n".join(lines)

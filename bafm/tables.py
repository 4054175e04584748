"""Result tables as text: CSV and GitHub Markdown, for the sweep, editing and training reports."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Dict, Mapping, Optional, Sequence


def format_cell(value: Any, spec: str) -> str:
    """One cell: None is blank (a metric not provided), NaN is ``nan``, floats use ``spec``."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], spec: str = ".8g") -> str:
    """CSV text with exactly ``columns``; floats formatted with ``spec``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_cell(row[c], spec) for c in columns])
    return buf.getvalue()


def markdown_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                  specs: Optional[Dict[str, str]] = None) -> str:
    """A GitHub Markdown table of ``columns``, numbers right-aligned; ``specs``: format per column."""
    specs = specs or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[c], specs.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"

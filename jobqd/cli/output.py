"""How jobqctl prints: aligned tables that fit the terminal, or one JSON document for scripts."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO

WIDTH = 100
"""Tables are cut to fit this many columns, the widest column first."""

ELLIPSIS = "…"


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(document: Any) -> str:
    return json.dumps(document, default=_default, ensure_ascii=False, indent=2)


def emit_json(document: Any, stream: TextIO) -> None:
    stream.write(to_json(document) + "\n")


def age(seconds: float | None) -> str:
    """A duration for people: 850ms, 42s, 4m12s, 2h05m, 3d04h; '-' when there is none."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    if seconds < 0:
        seconds = 0.0
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def when(value: datetime | None) -> str:
    """A timestamp to the second, in its own zone."""
    if value is None:
        return "-"
    return value.isoformat(sep=" ", timespec="seconds")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, Mapping | list):
        return json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))
    return " ".join(str(value).split())


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    width: int = WIDTH,
    right: Sequence[int] = (),
) -> str:
    """Rows under headers, columns two spaces apart; columns listed in `right` (numbers) are
    right-aligned. When the table is too wide, the widest columns are cut with an ellipsis."""
    text = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text:
        for index, value in enumerate(row):
            widths[index] = max(widths[index], len(value))
    gap = 2 * (len(headers) - 1)
    while sum(widths) + gap > width:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        floor = max(len(headers[widest]), 4)
        if widths[widest] <= floor:
            break
        widths[widest] -= 1

    def line(values: Sequence[str]) -> str:
        parts = []
        for index, value in enumerate(values):
            if len(value) > widths[index]:
                value = value[: widths[index] - 1] + ELLIPSIS
            if index in right:
                parts.append(value.rjust(widths[index]))
            else:
                parts.append(value.ljust(widths[index]))
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in text)])


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """`name: value` lines with the values aligned, for one record (`jobqctl show`)."""
    pad = max((len(name) for name, _ in pairs), default=0) + 1
    return "\n".join(f"{(name + ':').ljust(pad)} {cell(value)}" for name, value in pairs)

"""Turning a page's data into HTML: the Jinja environment, its filters, the hour chart.

Jinja2 (the `dashboard` extra) because it escapes every value by default, which is the
property the dashboard depends on most (args, errors and tracebacks are user data), and its
layout inheritance and macros keep seven pages to one frame and a few loops.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import quote

from jobqd.cli import output
from jobqd.errors import JobqdError

try:
    import jinja2
except ImportError:  # pragma: no cover - depends on the installation
    jinja2 = None  # type: ignore[assignment]

CHART_WIDTH = 180
CHART_HEIGHT = 32
INSTALL_HINT = "the dashboard needs Jinja2: pip install 'jobqd[dashboard]'"


def environment(static_version: str) -> Any:
    """The template environment; JobqdError naming the extra when Jinja2 is missing."""
    if jinja2 is None:
        raise JobqdError(INSTALL_HINT)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("jobqd.http.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(age=output.age, when=when, pretty=pretty, first=first, segment=segment)
    env.globals.update(chart=chart, static_version=static_version)
    return env


def when(value: datetime | None) -> str:
    return output.when(value)


def segment(name: str) -> str:
    """A name as one path segment of a URL: every reserved character escaped, `/` too."""
    return quote(str(name), safe="")


def pretty(value: Any) -> str:
    """JSON for reading: indented, non-ASCII kept."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def first(text: str | None, width: int = 120) -> str:
    """The first line of `text`, cut to `width` characters."""
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + output.ELLIPSIS


def chart(minutes: list[tuple[int, int]] | None) -> dict[str, Any]:
    """Bars for one queue's last hour, oldest minute first: succeeded above, dead in red
    stacked on top, scaled to the busiest minute. Returned as geometry; the template draws
    the SVG, so every value still goes through its escaping."""
    minutes = minutes or [(0, 0)] * 60
    peak = max((ok + dead for ok, dead in minutes), default=0) or 1
    step = CHART_WIDTH / len(minutes)
    bars = []
    for index, (ok, dead) in enumerate(minutes):
        ok_height = CHART_HEIGHT * ok / peak
        dead_height = CHART_HEIGHT * dead / peak
        x = round(index * step, 2)
        ago = len(minutes) - index
        bars.append(
            {
                "x": x,
                "width": round(max(step - 0.6, 0.5), 2),
                "ok_y": round(CHART_HEIGHT - ok_height, 2),
                "ok_height": round(ok_height, 2),
                "dead_y": round(CHART_HEIGHT - ok_height - dead_height, 2),
                "dead_height": round(dead_height, 2),
                "title": f"{ago} min ago: {ok} succeeded, {dead} dead",
            }
        )
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bars": bars,
        "succeeded": sum(ok for ok, _ in minutes),
        "dead": sum(dead for _, dead in minutes),
        "peak": peak if any(ok or dead for ok, dead in minutes) else 0,
    }

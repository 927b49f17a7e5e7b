"""Process titles, so ``ps`` and ``top`` show what each jobqd process is doing."""

from __future__ import annotations

from collections.abc import Callable

PREFIX = "jobqd: "

_setproctitle: Callable[[str], None] | None
try:
    from setproctitle import setproctitle as _setproctitle
except ImportError:  # titles are cosmetic: run without them rather than fail
    _setproctitle = None


def set_title(title: str) -> None:
    """Set the title to ``jobqd: <title>``, e.g. ``set_title("worker emails#0 3/8")``."""
    if _setproctitle is not None:
        _setproctitle(PREFIX + title)

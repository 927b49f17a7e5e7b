"""Logging setup shared by the master and every child.

Each process writes whole lines to the stdout it inherited; systemd or Docker collect them.
Records carry the process ``role`` and ``pid`` (read when the record is handled, because
children are forked from the master), plus any ``extra`` fields and the fields bound with
:func:`log_context` on the current thread.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("auto", "json", "text", "journal")

JOB_FIELDS = ("job_id", "queue", "task", "attempt")
"""Job context fields; pass them as ``extra`` (or via :func:`log_context`) by these names."""

_role = "master"
_handler: logging.Handler | None = None
_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "jobqd_log_context", default=None
)

# Attributes of every LogRecord; anything else on a record came from `extra` or the context.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

# Kernel-style priorities that journald reads when SyslogLevelPrefix=yes (the default).
_JOURNAL_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def setup_logging(
    fmt: str = "auto",
    level: str = "info",
    role: str = "master",
    stream: TextIO | None = None,
) -> None:
    """Install (or replace) jobqd's handler on the root logger.

    Safe to call again, e.g. in a child right after fork with its own role. ``stream``
    defaults to the current ``sys.stdout``. ``fmt`` is one of :data:`FORMATS`; ``auto`` picks
    ``journal`` when the stream is connected to journald, ``text`` on a terminal, else ``json``.
    """
    global _handler
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    levels = logging.getLevelNamesMapping()
    if level.upper() not in levels:
        raise ValueError(f"unknown log level {level!r}")
    stream = sys.stdout if stream is None else stream
    if fmt == "auto":
        fmt = _auto_format(stream)

    handler = logging.StreamHandler(stream)
    handler.addFilter(_add_context)
    handler.setFormatter(_FORMATTERS[fmt]())

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(levels[level.upper()])
    _handler = handler
    set_role(role)


def set_role(role: str) -> None:
    """Name the role of this process (``master``, ``worker``, ``maintenance``, ``http``)."""
    global _role
    _role = role


def log_context(**fields: Any) -> _LogContext:
    """Add ``fields`` to every record this thread logs inside a ``with`` block.

    A worker slot wraps each job in ``with log_context(job_id=..., queue=..., task=...,
    attempt=...)`` so that the task's own log lines carry the job too; ``extra`` wins.
    """
    return _LogContext(fields)


class _LogContext:
    """A plain class rather than @contextmanager: it is entered once per job."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        current = _context.get()
        self._token = _context.set({**current, **self._fields} if current else self._fields)

    def __exit__(self, *exc_info: object) -> None:
        _context.reset(self._token)


def _add_context(record: logging.LogRecord) -> bool:
    record.role = _role
    record.pid = os.getpid()
    context = _context.get()
    if context:
        for key, value in context.items():
            record.__dict__.setdefault(key, value)
    return True


def _auto_format(stream: TextIO) -> str:
    if _is_journal(stream):
        return "journal"
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def _is_journal(stream: TextIO) -> bool:
    """True when systemd connected ``stream`` to journald (``JOURNAL_STREAM=dev:inode``)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRS and key not in ("role", "pid") and not key.startswith("_")
    }


class _JsonFormatter(JsonFormatter):
    """One JSON object per line: ts, level, logger, message, role, pid, then extras."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message", "role", "pid"],
            rename_fields={"levelname": "level", "name": "logger"},
            json_default=str,
            json_ensure_ascii=False,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["ts"] = _iso_utc(record.created)
        super().add_fields(log_data, record, message_dict)


class _JournalFormatter(_JsonFormatter):
    """JSON behind a ``<N>`` priority prefix, which journald strips into ``PRIORITY=``."""

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for lvl, p in _JOURNAL_PRIORITIES if record.levelno >= lvl), 7)
        return f"<{priority}>{super().format(record)}"


class _TextFormatter(logging.Formatter):
    """Human-readable: ``2026-11-22 06:40:01.123 INFO  worker[1234] message key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        line = (
            f"{stamp}.{int(record.msecs):03d} {record.levelname:<5} "
            f"{record.role}[{record.pid}] {record.getMessage()}"
        )
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in extras.items())
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _iso_utc(created: float) -> str:
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_FORMATTERS = {"json": _JsonFormatter, "journal": _JournalFormatter, "text": _TextFormatter}

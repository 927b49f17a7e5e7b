"""Logging setup shared by the master and every child.

Each process writes whole lines to the stdout it inherited; systemd or Docker collect them.
Records carry the process ``role`` and ``pid`` (read when the record is handled, because
children are forked from the master), plus any ``extra`` fields and the fields bound with
:func:`log_context` on the current thread.

JSON lines (and the journal's) carry every field, and ``host``. Text lines are for a person at
a terminal: the process by name (``worker emails#0[1234]``), a job's id, task, queue and
attempt as words before the message, and only the fields the rest of the line does not say.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
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
_name = "master"  # the process as the text format names it: `worker emails#0`
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
    *,
    name: str | None = None,
) -> None:
    """Install (or replace) jobqd's handler on the root logger.

    Safe to call again, e.g. in a child right after fork with its own role. ``stream``
    defaults to the current ``sys.stdout``. ``fmt`` is one of :data:`FORMATS`; ``auto`` picks
    ``journal`` when the stream is connected to journald, ``text`` on a terminal, else ``json``.
    ``name`` is the process's name in text lines (a child's title), by default its role.
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
    set_role(role, name)


def set_role(role: str, name: str | None = None) -> None:
    """Name the role of this process (``master``, ``worker``, ``maintenance``, ``http``) and,
    for text lines, the process itself (``worker emails#0``; by default the role)."""
    global _role, _name
    _role = role
    _name = name or role


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
    """One JSON object per line: ts, level, logger, message, role, pid, host, then extras."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message", "role", "pid"],
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"host": socket.gethostname()},
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


_TEXT_HIDDEN = frozenset(
    {"child", "child_role", "index", "event", "outcome", "duration", "exit_status", "signal"}
    | set(JOB_FIELDS)
)
"""Fields a text line does not repeat: the message names the child, how it exited and a
job's outcome and duration, the process name says its queue and index, the job's words say
the job, and `event` is for machines."""


class _TextFormatter(logging.Formatter):
    """For a terminal: ``2026-11-22 06:40:01.123 INFO  worker emails#0[1234] job 42
    send_welcome on emails, attempt 2: succeeded in 12ms``, then the fields not said."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<5} {_name}[{record.pid}] "
        fields = record.__dict__
        if fields.get("job_id") is not None:
            line += _job_words(fields) + ": "
        line += record.getMessage()
        extras = _extras(record)
        shown = [
            f"{'pid' if key == 'child_pid' else key}={_text_value(value)}"
            for key, value in extras.items()
            if key not in _TEXT_HIDDEN
            and not (key == "queue" and ("child" in extras or _name.startswith("worker ")))
            and value not in ((), [], None)
        ]
        if shown:
            line += " " + " ".join(shown)
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _job_words(fields: Mapping[str, Any]) -> str:
    """``job 42 send_welcome on emails, attempt 2``: as much of it as the record has."""
    words = f"job {fields['job_id']}"
    if fields.get("task"):
        words += f" {fields['task']}"
    if fields.get("queue"):
        words += f" on {fields['queue']}"
    if fields.get("attempt") is not None:
        words += f", attempt {fields['attempt']}"
    return words


def _text_value(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        text = ", ".join(str(item) for item in value)
    elif isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = value if isinstance(value, str) else str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _iso_utc(created: float) -> str:
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_FORMATTERS = {"json": _JsonFormatter, "journal": _JournalFormatter, "text": _TextFormatter}

"""Exceptions and process exit codes shared by the daemon, the client and jobqctl."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An error's message cut to its first line, for one-line logs and answers; the
    exception's type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class JobqdError(Exception):
    """Base of every error jobqd raises on purpose."""


class MigrationError(JobqdError):
    """The schema cannot be brought up to date (edited, unknown or failing migration)."""


class PayloadError(JobqdError, ValueError):
    """A job's args are too large to enqueue."""


class DatabaseUnavailable(JobqdError):
    """Postgres could not be reached; the message says where and what to check."""


# Exit codes of `jobqd` (sysexits-style where one fits) and `jobqctl`.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CONFIG = 78
EXIT_BOOT_FAILED = 4
EXIT_RECYCLE = 10
"""A worker child's planned exit (hard timeout, max_jobs_per_process, max_memory): the master
replaces it at once, without restart backoff."""

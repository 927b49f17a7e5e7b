"""The database being away, as a state of the worker rather than an error: when it began,
how many reconnections were tried, when to try next; one log line as it starts, one as it
ends."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import psycopg

from jobqd.errors import DatabaseUnavailable, first_line

log = logging.getLogger("jobqd.worker")

UNREACHABLE = (psycopg.OperationalError, DatabaseUnavailable)
"""What "cannot reach the database" looks like from psycopg and from jobqd's connect."""

FIRST_RETRY = 0.05
MAX_RETRY = 1.0
"""Capped so that a worker claims again within about a second of the database's return."""


class Outage:
    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.began: float | None = None
        self.attempts = 0
        self.next_try = 0.0

    @property
    def active(self) -> bool:
        return self.began is not None

    def failed(self, exc: BaseException, *, doing: str, held: int, note: str = "") -> None:
        """An attempt to reach the database failed: log if this starts an outage, and
        schedule the next try (exponential, capped, jittered so workers do not retry in
        step)."""
        now = time.monotonic()
        if self.began is None:
            self.began = now
            self.attempts = 0
            log.warning(
                "database unreachable while %s (%s%s): not claiming; running jobs go on and "
                "%d outcome(s) are kept until it is back; retrying every %.0fs at most. Check "
                "the server and the network path to it",
                doing,
                note,
                first_line(exc),
                held,
                MAX_RETRY,
                extra=self.fields,
            )
        self.attempts += 1
        delay = min(MAX_RETRY, FIRST_RETRY * 2**self.attempts)
        self.next_try = now + delay * random.uniform(0.5, 1.0)

    def ended(self, *, written: int, dropped: int) -> None:
        """The database answered again and the held outcomes were written."""
        if self.began is None:
            return
        log.info(
            "database reachable again after %.1fs and %d attempt(s); %d held outcome(s) "
            "written, %d dropped (lease lost meanwhile); claiming again",
            time.monotonic() - self.began,
            self.attempts,
            written,
            dropped,
            extra={
                **self.fields,
                "outage_seconds": round(time.monotonic() - self.began, 3),
                "attempts": self.attempts,
                "written": written,
                "dropped": dropped,
            },
        )
        self.began = None

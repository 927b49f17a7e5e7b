"""Job and bundle end events: what migration 0003 publishes, and a listener for Python programs.

The database sends a NOTIFY on the channel `<schema>_events` when a job of a queue with events
on ends (succeeded, dead, cancelled) and when a bundle's last job ends. Events are a hint, like
every NOTIFY: one sent while a listener is disconnected is lost, so a program that must not miss
an outcome also reads the jobs table (for example after reconnecting).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from jobqd.errors import DatabaseUnavailable
from jobqd.store.connections import connect, subscribe
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.events")

_RECONNECT_PAUSE = 1.0


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A job reached an end state."""

    id: int
    queue: str
    task: str
    state: str
    attempt: int
    type: str = "job"


@dataclass(frozen=True, slots=True)
class BundleEvent:
    """Every job of a bundle has ended; `callback_job_id` is the callback job, if any."""

    id: int
    name: str | None
    total: int
    succeeded: int
    dead: int
    cancelled: int
    callback_job_id: int | None
    type: str = "bundle"


Event = JobEvent | BundleEvent


def channel(schema: str) -> str:
    """The NOTIFY channel of `schema`'s events."""
    return f"{schema}_events"


def parse(payload: str) -> Event | None:
    """An event from a NOTIFY payload; None for anything this version does not know."""
    try:
        data = json.loads(payload)
        if data.get("type") == "job":
            return JobEvent(
                id=int(data["id"]),
                queue=str(data["queue"]),
                task=str(data["task"]),
                state=str(data["state"]),
                attempt=int(data["attempt"]),
            )
        if data.get("type") == "bundle":
            return BundleEvent(
                id=int(data["id"]),
                name=data.get("name"),
                total=int(data["total"]),
                succeeded=int(data["succeeded"]),
                dead=int(data["dead"]),
                cancelled=int(data["cancelled"]),
                callback_job_id=data.get("callback_job_id"),
            )
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("unreadable event payload skipped: %.200s", payload)
    return None


def set_events(conn: psycopg.Connection, schema: str, queue: str, enabled: bool) -> None:
    """Turn job end events of `queue` on or off, cluster-wide."""
    conn.execute(queries(schema).queues_set_events, {"queue": queue, "enabled": enabled})


def enabled_queues(conn: psycopg.Connection, schema: str) -> list[str]:
    return [row[0] for row in conn.execute(queries(schema).queues_with_events).fetchall()]


class Listener:
    """Events as they arrive, for `timeout` seconds (None: until closed or the caller stops).

    Subscribed once the constructor returns, so nothing that ends after it is missed while the
    session lasts. `queues` keeps only job events of those queues (bundle events always pass).
    A lost session is reopened; events sent in between are lost. Queues without events on send
    no job events: a warning names them.
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        queues: Collection[str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.queues = None if queues is None else frozenset(queues)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._conn: psycopg.Connection | None = self._open()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                remaining = None if self.deadline is None else self.deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                if self._conn is None:
                    try:
                        self._conn = self._open()
                    except DatabaseUnavailable as exc:
                        log.warning("event listener cannot reconnect: %s", exc)
                        time.sleep(min(_RECONNECT_PAUSE, remaining or _RECONNECT_PAUSE))
                        continue
                try:
                    for notify in self._conn.notifies(timeout=remaining, stop_after=1):
                        event = parse(notify.payload)
                        if event is not None and self._wanted(event):
                            yield event
                except psycopg.OperationalError as exc:
                    log.warning("event listener lost its database session: %s; reconnecting", exc)
                    self.close()
        finally:
            self.close()

    def _open(self) -> psycopg.Connection:
        conn = connect(self.dsn, application_name="jobqd events", statement_timeout_ms=10_000)
        subscribe(conn, channel(self.schema))
        on = set(enabled_queues(conn, self.schema))
        off = sorted(self.queues - on) if self.queues is not None else []
        if off or not on:
            log.warning(
                "job events are off for %s: no job events come from there until "
                "`jobqctl events on QUEUE` (or SELECT %s.set_events(queue, true))",
                ", ".join(off) if off else "every queue",
                self.schema,
            )
        return conn

    def _wanted(self, event: Event) -> bool:
        return self.queues is None or not isinstance(event, JobEvent) or event.queue in self.queues


def listen(
    dsn: str,
    schema: str,
    *,
    queues: Collection[str] | None = None,
    timeout: float | None = None,
) -> Listener:
    """A subscribed :class:`Listener`; iterate it for events."""
    return Listener(dsn, schema, queues=queues, timeout=timeout)


def dispatch(events: Iterable[Event], callback: Callable[[Event], Any]) -> int:
    """Call `callback` for each event; returns how many were handled."""
    count = 0
    for event in events:
        callback(event)
        count += 1
    return count

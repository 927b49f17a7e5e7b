"""Long-poll claims: one LISTEN session in the http child wakes every waiting HTTP claim.

A claim with `wait` that finds nothing registers a waiter for its queue and sleeps on a
`threading.Event`; no database session is held while it waits. One thread (`listener`) owns
one connection that LISTENs on the channel of every queue with waiters and sets their events
on each NOTIFY (enqueue, retry, resume). NOTIFY is a hint: the same thread also asks the
database once per `DUE_INTERVAL` which of those queues have a due job (delays, retries and
snoozes become due without a NOTIFY), one statement for all of them. When that connection is
lost (a database restart) the thread reconnects with a capped backoff and the waiters poll on
their own every `DUE_INTERVAL` meanwhile, so a wake-up is late at worst, never lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from jobqd.errors import DatabaseUnavailable, first_line
from jobqd.store.connections import connect, subscribe, unsubscribe
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.http")

DUE_INTERVAL = 1.0
"""Seconds between checks for due jobs without a NOTIFY, and between a waiter's own claims
while the listener is down."""
LINGER = 60.0
"""Seconds a queue's channel stays LISTENed after its last waiter left, so an HTTP worker that
claims again soon does not wait for a LISTEN each time."""
MAX_CHANNELS = 1000
"""Queues LISTENed at most; past that, idle channels are dropped first."""
LISTEN_TIMEOUT_MS = 5_000
"""The listener's statements and unacknowledged sends fail after this: a link that went silent
is given up within seconds, and the waiters poll until it is back."""
_RECONNECT_PAUSES = (0.5, 1.0, 2.0, 5.0)
_SLICE = 0.5
"""Longest sleep between checks that the client is still connected."""


class TooManyWaiters(Exception):
    """Every place for a waiting claim is taken (`http.max_waiters`)."""


class Waiter:
    """One waiting claim: its queue and the event the listener sets."""

    __slots__ = ("event", "queue")

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.event = threading.Event()


class Wakeups:
    """The waiting claims of this http child and the one listener that wakes them."""

    def __init__(self, dsn: str, schema: str, *, application_name: str, max_waiters: int) -> None:
        self.dsn = dsn
        self.schema = schema
        self.sql = queries(schema)
        self.application_name = f"{application_name} http listen"
        self.max_waiters = max_waiters
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        self._count = 0
        self._listened: dict[str, str] = {}  # queue -> channel, LISTENed on the live session
        self._idle_since: dict[str, float] = {}  # queue -> when its last waiter left
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._thread: threading.Thread | None = None

    # -- for the requests ---------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._count

    def listening(self, queue: str) -> bool:
        """Whether a NOTIFY on `queue` reaches its waiters now."""
        with self._lock:
            return queue in self._listened

    @contextlib.contextmanager
    def waiter(self, queue: str) -> Iterator[Waiter]:
        """A place to wait on `queue`; TooManyWaiters when all are taken."""
        waiter = Waiter(queue)
        with self._lock:
            if self._count >= self.max_waiters:
                raise TooManyWaiters(self.max_waiters)
            self._count += 1
            new = queue not in self._waiters and queue not in self._listened
            self._waiters.setdefault(queue, set()).add(waiter)
            self._idle_since.pop(queue, None)
        if new:
            self._poke()
        try:
            yield waiter
        finally:
            with self._lock:
                self._count -= 1
                waiters = self._waiters.get(queue)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[queue]
                        self._idle_since[queue] = time.monotonic()

    def long_poll(
        self,
        queue: str,
        claim: Callable[[], list[Any]],
        wait: float,
        gone: Callable[[], bool] = lambda: False,
    ) -> list[Any]:
        """`claim()` now and, while it finds nothing, again after each wake-up of `queue`,
        until it finds jobs or `wait` seconds have passed (then once more), the client is
        gone (`gone()`) or the child stops."""
        deadline = time.monotonic() + wait
        with self.waiter(queue) as waiter:
            while True:
                waiter.event.clear()
                jobs = claim()
                if jobs or time.monotonic() >= deadline:
                    return jobs
                if not self._sleep(waiter, deadline, gone):
                    return []

    def _sleep(self, waiter: Waiter, deadline: float, gone: Callable[[], bool]) -> bool:
        """Until a wake-up, the deadline, or (while the listener is down) the next poll;
        False when the client went away or the child is stopping."""
        poll_at = time.monotonic() + DUE_INTERVAL
        while True:
            if self._stopping.is_set() or gone():
                return False
            now = time.monotonic()
            until = deadline if self.listening(waiter.queue) else min(deadline, poll_at)
            if now >= until:
                return True
            if waiter.event.wait(min(until - now, _SLICE)):
                # a client that hung up meanwhile must not have jobs claimed for it
                return not self._stopping.is_set() and not gone()

    # -- the listener thread -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Wake every waiter (it answers with no jobs) and end the listener."""
        self._stopping.set()
        with self._lock:
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.event.set()
        self._poke()
        if self._thread is not None:
            self._thread.join(5)
        # The wake pipe stays open: a request still running may poke it, and a closed
        # descriptor's number could by then belong to another file.

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_write, b"x")

    def _serve(self) -> None:
        try:
            self._run()
        except Exception:  # a bug: say so; the waiters go on polling every DUE_INTERVAL
            log.exception("the LISTEN thread for waiting HTTP claims failed; they poll instead")

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                conn = connect(
                    self.dsn,
                    application_name=self.application_name,
                    statement_timeout_ms=LISTEN_TIMEOUT_MS,
                    connect_timeout=3,
                    tcp_user_timeout_ms=LISTEN_TIMEOUT_MS,
                )
            except (psycopg.Error, DatabaseUnavailable) as exc:
                pause = _RECONNECT_PAUSES[min(failures, len(_RECONNECT_PAUSES) - 1)]
                if failures == 0:
                    log.warning(
                        "cannot LISTEN for waiting HTTP claims (%s); they poll every %gs "
                        "until the database answers",
                        first_line(exc),
                        DUE_INTERVAL,
                    )
                failures += 1
                self._pause(pause)
                continue
            if failures:
                log.info("LISTEN for waiting HTTP claims is back after %d attempts", failures)
            failures = 0
            try:
                self._listen(conn)
            except (psycopg.Error, DatabaseUnavailable) as exc:
                if not self._stopping.is_set():
                    log.warning(
                        "the LISTEN session for waiting HTTP claims was lost (%s); "
                        "reconnecting, they poll meanwhile",
                        first_line(exc),
                    )
                    failures = 1
            finally:
                with self._lock:
                    self._listened.clear()
                conn.close()

    def _pause(self, seconds: float) -> None:
        selector = selectors.DefaultSelector()
        with selector:
            selector.register(self._wake_read, selectors.EVENT_READ)
            deadline = time.monotonic() + seconds
            while not self._stopping.is_set() and time.monotonic() < deadline:
                if selector.select(deadline - time.monotonic()):
                    self._drain_pipe()

    def _drain_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake_read, 4096)

    def _listen(self, conn: psycopg.Connection) -> None:
        """LISTEN for every queue with waiters, wake them on NOTIFY and on due jobs, until
        the session fails or the child stops."""
        selector = selectors.DefaultSelector()
        with selector:
            selector.register(conn.pgconn.socket, selectors.EVENT_READ, "notify")
            selector.register(self._wake_read, selectors.EVENT_READ, "poke")
            next_due = time.monotonic()
            while not self._stopping.is_set():
                self._subscribe(conn)
                now = time.monotonic()
                if now >= next_due:
                    next_due = now + DUE_INTERVAL
                    self._wake_due(conn)
                for key, _ in selector.select(max(0.0, next_due - time.monotonic())):
                    if key.data == "poke":
                        self._drain_pipe()
                    else:
                        self._wake_notified(conn)

    def _subscribe(self, conn: psycopg.Connection) -> None:
        """LISTEN on queues that gained waiters; UNLISTEN those idle past LINGER."""
        now = time.monotonic()
        with self._lock:
            for queue in [q for q in self._idle_since if q not in self._listened]:
                del self._idle_since[queue]  # never LISTENed (the session was down): forget it
            wanted = [q for q in self._waiters if q not in self._listened]
            idle = [
                q
                for q, since in self._idle_since.items()
                if q in self._listened
                and q not in self._waiters
                and (now - since > LINGER or len(self._listened) > MAX_CHANNELS)
            ]
        for queue in idle:
            with self._lock:
                channel = self._listened.pop(queue)
                self._idle_since.pop(queue, None)
            unsubscribe(conn, channel)
        for queue in wanted:
            channel = conn.execute(self.sql.queues_channel, {"queue": queue}).fetchone()[0]
            subscribe(conn, channel)
            with self._lock:
                self._listened[queue] = channel

    def _wake(self, queues: set[str]) -> None:
        with self._lock:
            for queue in queues:
                for waiter in self._waiters.get(queue, ()):
                    waiter.event.set()

    def _wake_notified(self, conn: psycopg.Connection) -> None:
        channels = {notify.channel for notify in conn.notifies(timeout=0)}
        with self._lock:
            queues = {q for q, channel in self._listened.items() if channel in channels}
        self._wake(queues)

    def _wake_due(self, conn: psycopg.Connection) -> None:
        with self._lock:
            queues = list(self._waiters)
        if queues:
            rows = conn.execute(self.sql.queues_due, {"queues": queues}).fetchall()
            self._wake({row[0] for row in rows})

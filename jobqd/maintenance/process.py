"""The maintenance process: competes for leadership and, while leader, runs the duties.

Every node runs one. A standby tries for the leader lock every `maintenance.standby_retry`
(with jitter), and at once when the leader's graceful release notifies it. The leader ticks
every `maintenance.interval`, or sooner when a duty is due (a cron tick, say): it first proves
it still holds the lock, then runs each due duty (cron, the reaper, the pruner, priority
aging: jobqd.maintenance.duty), re-proving leadership before each, all on the session that
holds the lock (jobqd.maintenance.leader). Any error on that session, or a verification older
than the trust window, makes it step down at once: it closes the session, which frees the
lock, and becomes a standby. The loop is one thread sleeping on a wake-up pipe that signals
write to (and, as standby, on the lock session's socket).

Who leads is what pg_locks says (jobqd.maintenance.leader.current_leader): the process row
carries no leader flag, since a frozen leader's flag would outlive its lock. A database that
cannot be reached, at start or later, is a state: the process waits and retries with one log
line when the outage starts and one when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg

from jobqd.config.settings import Settings
from jobqd.daemon.ipc import Sender, Status
from jobqd.daemon.lifecycle import (
    STATUS_INTERVAL,
    ChildContext,
    ChildProcess,
    ProcessRow,
    Stopping,
)
from jobqd.errors import EXIT_CONFIG, EXIT_OK, DatabaseUnavailable, first_line
from jobqd.maintenance import pruner
from jobqd.maintenance.aging import Aging
from jobqd.maintenance.cron import Cron
from jobqd.maintenance.duty import Duty
from jobqd.maintenance.leader import LeaderSession, LeadershipLost, PoolerDetected, ensure_direct
from jobqd.maintenance.pruner import Pruner
from jobqd.maintenance.reaper import Reaper
from jobqd.observe.metrics import MetricStore, define_jobqd_metrics
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.maintenance")

_FIRST_RETRY = 0.5  # seconds before the first retry of an unreachable database; doubles


class Outage:
    """Tells the operator once that the database cannot be reached, and once that it is back
    (how long, how many failed tries), however many tries fail in between."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.tries = 0

    def failed(self, reason: str) -> bool:
        """A try failed; True when this starts an outage (then the line is logged here)."""
        self.tries += 1
        if self.since is not None:
            return False
        self.since = time.monotonic()
        log.warning("database unreachable: %s; waiting and retrying until it answers", reason)
        return True

    def ended(self, now_doing: str) -> None:
        if self.since is None:
            return
        log.info(
            "database reachable again after %.1fs and %d failed tries; %s",
            time.monotonic() - self.since,
            self.tries,
            now_doing,
            extra={"outage_seconds": round(time.monotonic() - self.since, 3), "tries": self.tries},
        )
        self.since, self.tries = None, 0


class Maintenance(ChildProcess):
    role = "maintenance"
    log = log

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        *,
        sender: Sender | None = None,
        parent_pid: int | None = None,
        on_title: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.sql = queries(settings.database.schema)
        super().__init__(
            sender=sender,
            parent_pid=parent_pid,
            on_title=on_title,
            row=ProcessRow(self.sql, "maintenance"),
        )
        self.metric_store = MetricStore()
        self.metrics = define_jobqd_metrics(self.metric_store)
        name = f"{settings.database.application_name} maintenance {socket.gethostname()}"
        self.session = LeaderSession(
            dsn,
            settings.database.schema,
            application_name=f"{name}:{os.getpid()}",
            statement_timeout=settings.database.statement_timeout,
            leader_timeout=settings.maintenance.leader_timeout,
        )
        self.leader = False
        now = time.monotonic()
        self._next_try = now
        self._next_tick = now
        self._next_heartbeat = now
        self._next_status = now
        self.duties: list[Duty] = [
            duty(settings, self.metrics) for duty in (Cron, Reaper, Pruner, Aging)
        ]
        self._heartbeat_interval = min(
            5.0, settings.reaper.process_grace / 3, settings.maintenance.leader_timeout / 2
        )
        self._last_db_error = ""
        self._outage = Outage()

    # -- life -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the exit code."""
        try:
            if not self._boot():
                return EXIT_OK
        except PoolerDetected as exc:
            log.error("refusing to run leader election: %s", exc)
            return EXIT_CONFIG
        try:
            self._loop()
        except PoolerDetected as exc:
            log.error("refusing to run leader election: %s", exc)
            return EXIT_CONFIG
        finally:
            self._shutdown()
        return EXIT_OK

    def _boot(self) -> bool:
        """Reach the database, register and say booted; while the database cannot be reached,
        wait and retry (capped backoff with jitter) rather than exit. False when stopped, or
        the master went away, before that."""
        delay = _FIRST_RETRY
        while True:
            try:
                ensure_direct(self.dsn, application_name=self.session.application_name + " probe")
                self.register(self.session.open())
                break
            except (DatabaseUnavailable, psycopg.OperationalError) as exc:
                self.session.close()
                if self._outage.failed(first_line(exc)):
                    self.on_title("maintenance waiting for the database")
            self.wait(delay * random.uniform(0.8, 1.2))
            if self.stopping is not Stopping.NO or self.master_gone():
                log.info("maintenance stopped while waiting for the database")
                return False
            delay = min(2 * delay, self.settings.maintenance.standby_retry)
        self._outage.ended("registering")
        self.on_title("maintenance standby")
        log.info("maintenance started as standby (process %s)", self.process_id)
        self.send_booted()
        return True

    def _loop(self) -> None:
        """Until TERM or QUIT (either just ends it: there is nothing to drain) or the master
        is gone."""
        while self.stopping is Stopping.NO:
            if self.master_gone():
                return
            now = time.monotonic()
            if not self.leader and self.session.released:
                self._next_try = now  # a graceful release was notified: try at once
            try:
                with self.session.busy():
                    if self.leader and now >= self._next_tick:
                        self._tick()
                    elif not self.leader and now >= self._next_try:
                        self._next_try = now + self._standby_retry()
                        self._try_to_lead()
                    if time.monotonic() >= self._next_heartbeat:
                        self._heartbeat()
                if self.session.connected:
                    self._outage.ended("leader" if self.leader else "standby")
            except PoolerDetected:
                raise
            except (psycopg.Error, DatabaseUnavailable, LeadershipLost) as exc:
                self._lost(exc)
            if time.monotonic() >= self._next_status:
                self._report()
            self._sleep()

    def _sleep(self) -> None:
        """Until the next deadline; a standby also wakes when its lock session has news
        (a release notification, or the server ending the session)."""
        deadlines = [self._next_heartbeat, self._next_status]
        deadlines.append(self._next_tick if self.leader else self._next_try)
        listen = () if self.leader or self.session.socket is None else (self.session.socket,)
        if self.wait(min(deadlines) - time.monotonic(), *listen):
            self._next_try = time.monotonic()

    def _standby_retry(self) -> float:
        retry = self.settings.maintenance.standby_retry
        return retry * random.uniform(0.8, 1.2)

    # -- leadership -------------------------------------------------------------------------

    def _try_to_lead(self) -> None:
        if not self.session.connected:
            self.session.open()
            self._last_db_error = ""
        if not self.session.try_acquire():
            return
        self.leader = True
        log.info(
            "became the leader (lock session backend %s); running cron, reaper, pruning, aging",
            self.session.backend_pid,
        )
        self.on_title("maintenance leader")
        self.metrics.leader.set(1)
        now = time.monotonic()
        self._next_tick = now
        for duty in self.duties:
            duty.start(now)
        self._heartbeat()
        if pruner.sync_settings(self.session.conn, self.settings):  # type: ignore[arg-type]
            log.info("cluster settings updated from this node's config")
        self._report()

    def _step_down(self, reason: str) -> None:
        was_leader, self.leader = self.leader, False
        self.session.close()
        self.metrics.leader.set(0)
        if was_leader:
            log.warning("stepped down as leader: %s", reason)
            self.on_title("maintenance standby")
            self._report()
        self._next_try = time.monotonic() + self._standby_retry()
        self._next_heartbeat = time.monotonic()

    def _lost(self, exc: BaseException) -> None:
        """A database error: as leader, step down; as standby, reconnect at the next try."""
        message = first_line(exc)
        if isinstance(exc, psycopg.OperationalError):
            message = f"database session lost: {message}"
        if self.leader:
            self._step_down(message)
        else:
            started = self._outage.failed(message)
            if message != self._last_db_error and not started:
                log.warning("standby: %s; retrying", message)
            self._last_db_error = message
            self.session.close()
            self._next_heartbeat = self._next_try

    def _ensure_trusted(self) -> None:
        if not self.session.trusted():
            raise LeadershipLost("the leader lock was not verified recently enough")

    # -- the leader's tick ------------------------------------------------------------------

    def _tick(self) -> None:
        """Run the due duties, proving leadership first and re-proving it before each; the
        next tick is at the latest one interval on, sooner when a duty is due sooner."""
        self.session.verify()
        conn = self.session.conn
        assert conn is not None
        now = time.monotonic()
        self._next_tick = now + self.settings.maintenance.interval
        for duty in self.duties:
            if duty.due(now):
                self._ensure_trusted()
                duty.run_due(conn, now)
        self._next_tick = min(self._next_tick, *(duty.next_due for duty in self.duties))

    # -- registration, heartbeat, status ----------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The lock session's backend, which pg_locks names as the lock holder: no leader flag,
        which a frozen leader could not take back."""
        return {"backend_pid": self.session.backend_pid}

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self._heartbeat_interval
        self.heartbeat(self.session.open())

    def _report(self) -> None:
        self._next_status = time.monotonic() + STATUS_INTERVAL
        self.metrics.leader.set(1 if self.leader else 0)
        if self.sender is not None:
            self.send(Status(leader=self.leader, metrics=self.metric_store.snapshot_delta()))

    def _shutdown(self) -> None:
        if self.leader:
            log.info("stepping down as leader: shutting down")
            with contextlib.suppress(psycopg.Error):
                self.session.release()
        self.leader = False
        if self.process_id is not None and self.session.connected:
            with contextlib.suppress(psycopg.Error):
                self.deregister(self.session.open())
        self.session.close()
        self._report()
        log.info("maintenance stopped")


def serve(
    settings: Settings,
    dsn: str,
    *,
    sender: Sender | None = None,
    parent_pid: int | None = None,
    on_title: Callable[[str], None] | None = None,
) -> int:
    """Everything the maintenance process does after it exists: handle signals (TERM and QUIT
    stop it, INT and HUP are the master's), compete for leadership, run the duties as leader.
    Returns the exit code: 0 when stopped (also while still waiting for the database),
    EXIT_CONFIG behind a session-multiplexing pooler."""
    maintenance = Maintenance(
        settings, dsn, sender=sender, parent_pid=parent_pid, on_title=on_title
    )
    maintenance.install_signals()
    return maintenance.run()


def serve_child(child: ChildContext) -> int:
    """The maintenance role's entry for the master (jobqd.daemon.lifecycle.ROLES)."""
    return serve(
        child.settings,
        child.dsn,
        sender=child.sender,
        parent_pid=child.parent_pid,
        on_title=child.on_title,
    )

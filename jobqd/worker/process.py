"""The worker process: claims jobs of one queue, runs them on `concurrency` threads, keeps
their leases alive, and writes their outcomes in batches.

One control thread does every database round trip (claim, heartbeat, finish, release), so the
runner threads only ever run tasks. Each round trip has a deadline of lease/3 (a watchdog cuts
a link that stops answering), and the database being away is a state (`Outage`), not an
error: the worker stops claiming, its jobs run on, their outcomes wait, and it reconnects with
a capped backoff. A lease the worker cannot renew ends on its own clock first (`LocalLeases`):
the job is flagged cancelled and nothing is written for it.

The control thread sleeps on one selector over the LISTEN connection's socket and a wake-up
pipe that signals and runner threads write to; it wakes for a notification, a finished job, a
signal, or the next deadline (heartbeat, poll, flush, drain, reconnect).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue as queue_module
import selectors
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from jobqd.backoff import Backoff
from jobqd.daemon.ipc import Sender, Status
from jobqd.daemon.lifecycle import (
    STATUS_INTERVAL,
    ChildContext,
    ChildProcess,
    ProcessRow,
    Stopping,
)
from jobqd.errors import EXIT_RECYCLE, first_line
from jobqd.maintenance import reaper
from jobqd.observe.metrics import MetricStore, define_jobqd_metrics
from jobqd.store.connections import RoundTripWatchdog, connect, subscribe
from jobqd.store.sql import int_array, queries
from jobqd.tasks import Job, Registry, end_programs
from jobqd.worker.completer import Completer
from jobqd.worker.executor import QUEUED, Executor, Policy, claimed_job, queue_waits
from jobqd.worker.inflight import LEASE_LOST, InFlight
from jobqd.worker.joblog import JobLog
from jobqd.worker.leases import LocalLeases
from jobqd.worker.outage import UNREACHABLE, Outage

log = logging.getLogger("jobqd.worker")

_RECONNECT_PAUSE = 1.0
_TIMEOUT_CHECK_INTERVAL = 0.1
_PROGRAM_GRACE_AT_EXIT = 1.0
"""SIGTERM to SIGKILL for command tasks' programs when the worker exits: the master kills a
worker 1.5 s after it told it to stop (QUIT_GRACE), and the jobs must be released before."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, already resolved (no config file access after fork).

    Built by from_settings: the defaults are the config's (jobqd.config.settings), not
    repeated here."""

    dsn: str
    schema: str
    queue: str
    concurrency: int
    lease: float
    heartbeat: float | None
    poll_interval: float
    max_attempts: int
    backoff: Backoff
    timeout: float | None
    grace: float
    delivery: str
    max_jobs_per_process: int | None
    max_memory: int | None
    completion_batch: int
    completion_interval: float
    events: bool | None
    log_jobs: bool
    shutdown_timeout: float
    statement_timeout: float
    # (process id, how it died) of this queue's workers the master saw die
    dead_workers: tuple[tuple[int, str], ...] = ()
    index: int = 0
    application_name: str = "jobqd"  # database.application_name: the prefix of our sessions'

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat or self.lease / 3

    @property
    def round_trip_bound(self) -> float:
        """No round trip may take longer: a dead link is cut within lease/3."""
        return self.lease / 3

    @property
    def lease_margin(self) -> float:
        """How much before the database's expiry this worker gives a lease up."""
        return min(self.lease / 2, max(0.5, self.lease / 10))

    @classmethod
    def from_settings(
        cls,
        dsn: str,
        settings: Any,
        queue: str,
        index: int = 0,
        dead_workers: tuple[tuple[int, str], ...] = (),
    ) -> WorkerConfig:
        q = settings.queues[queue]
        return cls(
            dsn=dsn,
            dead_workers=dead_workers,
            schema=settings.database.schema,
            queue=queue,
            concurrency=q.concurrency,
            lease=q.lease,
            heartbeat=q.heartbeat,
            poll_interval=q.poll_interval,
            max_attempts=q.max_attempts,
            backoff=Backoff.from_settings(q.backoff),
            timeout=q.timeout,
            grace=q.grace,
            delivery=q.delivery,
            max_jobs_per_process=q.max_jobs_per_process,
            max_memory=q.max_memory,
            completion_batch=q.completion_batch,
            completion_interval=q.completion_interval,
            events=q.events,
            log_jobs=q.log_jobs,
            shutdown_timeout=settings.shutdown_timeout,
            statement_timeout=settings.database.statement_timeout,
            index=index,
            application_name=settings.database.application_name,
        )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Worker(ChildProcess):
    """The claim loop, the heartbeat and the process's life; the jobs it holds are in
    `inflight`, the writing of their outcomes in `completer`."""

    role = "worker"
    log = log

    def __init__(
        self,
        config: WorkerConfig,
        registry: Registry,
        *,
        sender: Sender | None = None,
        parent_pid: int | None = None,
        on_title: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.sql = queries(config.schema)
        super().__init__(
            sender=sender,
            parent_pid=parent_pid,
            on_title=on_title,
            row=ProcessRow(self.sql, "worker", config.queue, self.fields()),
        )
        self.registry = registry
        self.executor = Executor(
            registry,
            Policy(config.max_attempts, config.backoff, config.timeout, release_unknown=True),
        )
        self.metric_store = MetricStore()
        self.metrics = define_jobqd_metrics(self.metric_store)
        self.inflight = InFlight(config.concurrency)
        self.joblog = JobLog(config.log_jobs)
        self.completer = Completer(self.sql, config.queue, self.metrics, registry, self.joblog)
        self._ready: queue_module.SimpleQueue[Job | None] = queue_module.SimpleQueue()

        self._exit_code = 0
        self._jobs_run = 0
        self._claim_now = True
        self._next_poll = 0.0
        self._timeouts = config.timeout is not None or any(
            spec.timeout is not None for spec in registry.specs()
        )
        self._next_timeout_check = 0.0
        self._conn: psycopg.Connection | None = None
        self._listen: psycopg.Connection | None = None
        self._listen_fd = -1
        self._threads: list[threading.Thread] = []
        self._watchdog = RoundTripWatchdog(config.round_trip_bound, name="db-watchdog")
        self._tripped_seen = 0
        self.leases = LocalLeases(config.lease, config.lease_margin)
        self._outage = Outage(self.fields())
        self._next_heartbeat = 0.0

    # -- stopping -----------------------------------------------------------------------

    @property
    def _drain_deadline(self) -> float:
        """Drain: no new claims, running jobs may finish until shutdown_timeout; then (or on
        a fast stop) the jobs still running are released."""
        return self.stop_requested_at + self.config.shutdown_timeout

    # -- connections ----------------------------------------------------------------------

    def _app_name(self) -> str:
        return f"{self.config.application_name} worker {self.config.queue}#{self.config.index}"

    def _connect(self, application_name: str, **kw: Any) -> psycopg.Connection:
        """A session whose connect and unacknowledged sends are bounded like its round trips."""
        bound = self.config.round_trip_bound
        return connect(
            self.config.dsn,
            application_name=application_name,
            connect_timeout=math.ceil(bound),
            tcp_user_timeout_ms=int(bound * 1000),
            **kw,
        )

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect(
                self._app_name(),
                statement_timeout_ms=int(self.config.statement_timeout * 1000),
            )
            self._conn.prepare_threshold = 0
        return self._conn

    def _drop_db(self) -> None:
        if self._conn is not None:
            with self._watchdog.closing():
                self._conn.close()
            self._conn = None

    def _open_listen(self, selector: selectors.BaseSelector) -> None:
        conn = None
        try:
            conn = self._connect(self._app_name() + " listen")
            with self._watchdog.busy(conn):
                channel = conn.execute(
                    self.sql.queues_channel, {"queue": self.config.queue}
                ).fetchone()
                subscribe(conn, channel[0])
        except Exception as exc:
            if conn is not None:
                with self._watchdog.closing():
                    conn.close()
            log.warning("LISTEN unavailable, polling only: %s", exc, extra=self.fields())
            return
        self._listen = conn
        self._listen_fd = conn.pgconn.socket
        selector.register(self._listen_fd, selectors.EVENT_READ, "listen")

    def _drain_notifies(self, selector: selectors.BaseSelector) -> None:
        assert self._listen is not None
        try:
            for _ in self._listen.notifies(timeout=0):
                pass
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost (%s); reconnecting", exc, extra=self.fields())
            selector.unregister(self._listen_fd)
            with self._watchdog.closing():
                self._listen.close()
            self._listen = None

    def fields(self) -> dict[str, Any]:
        return {"queue": self.config.queue, "index": self.config.index}

    def metadata(self) -> dict[str, Any]:
        return {
            "index": self.config.index,
            "busy": self.inflight.busy,
            "concurrency": self.config.concurrency,
        }

    # -- life -----------------------------------------------------------------------------

    def release_dead(self, dead: tuple[tuple[int, str], ...]) -> None:
        """Release at once the jobs of predecessors the master saw die, given as (process
        id, how it died), rather than leave them to the reaper when their leases expire: a
        dead process cannot write any more. They go through the reaper's own function, so
        retries, attempt limits and at-most-once delivery are decided exactly as for an
        expired lease, and each job's error says how its worker died."""
        db = self._db()
        with db.transaction():
            jobs = reaper.release(db, self.sql, dead)
            for process_id, _ in dead:
                db.execute(self.sql.processes_deregister, {"process_id": process_id})
        for job in jobs:
            log.warning(
                "job of a worker process that died released: %s", job.outcome, extra=job.fields
            )

    def sync_definitions(self) -> None:
        """Tell the database this queue's and these tasks' retry and delivery settings, which
        the reaper needs for jobs whose worker died, each task's queue, where jobs enqueued
        without one go, and the queue's events switch if the config sets it."""
        db = self._db()
        db.execute(
            self.sql.queues_sync,
            {
                "queue": self.config.queue,
                "max_attempts": self.config.max_attempts,
                "delivery": self.config.delivery,
            },
        )
        if self.config.events is not None:
            db.execute(
                self.sql.queues_sync_events,
                {"queue": self.config.queue, "enabled": self.config.events},
            )
        for spec in self.registry.specs():
            db.execute(
                self.sql.tasks_sync,
                {
                    "name": spec.name,
                    "queue": spec.queue,
                    "max_attempts": spec.max_attempts,
                    "delivery": spec.delivery,
                },
            )

    def run(self) -> int:
        """Serve the queue until stopped; returns the process exit code."""
        if not self._boot():
            self._close()
            log.info("worker stopped before it could start", extra=self.fields())
            return self._exit_code
        self._set_title()  # a booted worker's title shows its slots: ps tells it from a booting one
        self.send_booted()
        log.info(
            "worker started: %d slots, lease %.0fs",
            self.config.concurrency,
            self.config.lease,
            extra=self.fields(),
        )
        for n in range(self.config.concurrency):
            thread = threading.Thread(target=self._slot, name=f"slot-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        threading.Thread(target=self._watch_leases, name="leases", daemon=True).start()
        try:
            self._loop()
        finally:
            self._shutdown()
        return self._exit_code

    def _boot(self) -> bool:
        """Release dead predecessors' jobs, register, sync definitions. While the database is
        away, wait for it (reporting to the master meanwhile) rather than exit and be
        restarted; False when told to stop first."""
        next_status = 0.0
        while True:
            try:
                db = self._db()
                with self._watchdog.busy(db):
                    if self.config.dead_workers:
                        self.release_dead(self.config.dead_workers)
                    if self.process_id is None:
                        self.register(db)
                    self.sync_definitions()
                break
            except UNREACHABLE as exc:
                self._lost_database(exc, "starting")
            while (now := time.monotonic()) < self._outage.next_try:
                self.master_gone()
                if self.stopping is not Stopping.NO:
                    return False
                if now >= next_status:
                    self._report_status()
                    next_status = now + STATUS_INTERVAL
                self.wait(min(self._outage.next_try, next_status) - now)
        self._outage.ended(written=0, dropped=0)
        return True

    def _lost_database(self, exc: BaseException, doing: str) -> None:
        """The database cannot be reached: drop the session, enter (or stay in) the outage."""
        self._drop_db()
        note = ""
        if self._watchdog.tripped != self._tripped_seen:
            self._tripped_seen = self._watchdog.tripped
            note = f"no answer within {self.config.round_trip_bound:.1f}s, link cut: "
        self._outage.failed(exc, doing=doing, held=self.inflight.waiting, note=note)

    def _recover(self) -> None:
        """One try to come back: write the held outcomes (fenced: those whose lease was lost
        meanwhile are dropped), renew the leases, then claim as usual."""
        try:
            taken, written = self._exchange(claim=False)
            self._heartbeat()
        except UNREACHABLE as exc:
            self._lost_database(exc, "reconnecting")
            return
        self._outage.ended(written=written, dropped=taken - written)
        now = time.monotonic()
        self._claim_now = True
        self._next_poll = now
        self._next_heartbeat = now + self.config.heartbeat_interval

    def _watch_leases(self) -> None:
        """The local end of leases, on a thread of its own: the control thread may be blocked
        in a round trip (up to its bound) or a connect when a lease runs out."""
        interval = min(0.1, self.config.lease_margin / 4)
        while True:
            time.sleep(interval)
            if self.inflight.busy and self.leases.overdue():
                for job in self.leases.expired(self.inflight.running()):
                    self._give_up(job)

    def _give_up(self, job: Job) -> None:
        self.inflight.lose(job)
        job.cancel(LEASE_LOST)
        log.warning(
            "lease not renewed in time (database unreachable): gave the job up before its "
            "lease expires; it is flagged cancelled, its outcome will not be written, and the "
            "reaper hands it out again",
            extra=job.log_fields(),
        )

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.wake_fd, selectors.EVENT_READ, "wake")
        self._open_listen(selector)
        now = time.monotonic()
        self._next_heartbeat = now + self.config.heartbeat_interval
        self._next_poll = now
        next_status = now
        next_listen_retry = now + _RECONNECT_PAUSE
        said_draining = False
        while True:
            now = time.monotonic()
            self.master_gone()
            if self.stopping is not Stopping.NO and not said_draining:
                said_draining = True
                self._set_title()
            if self.stopping is Stopping.FAST or (
                self.stopping is Stopping.DRAIN and now >= self._drain_deadline
            ):
                return
            self._check_timeouts(now)
            if self._outage.active:
                if now >= self._outage.next_try:
                    self._recover()
            else:
                self._work(now)
            if self.stopping is Stopping.DRAIN and self.inflight.empty():
                return
            if (
                self._listen is None
                and self.stopping is Stopping.NO
                and not self._outage.active
                and now >= next_listen_retry
            ):
                self._open_listen(selector)
                next_listen_retry = now + _RECONNECT_PAUSE * 5
            if now >= next_status:
                self._report_status()
                self._check_memory()
                next_status = now + STATUS_INTERVAL
            self._check_jobs_run()
            if self._outage.active:
                timeout = self._outage_wait(now, next_status)
            else:
                timeout = self._next_wait(now, self._next_heartbeat, self._next_poll, next_status)
            for key, _ in selector.select(timeout):
                if key.data == "wake":
                    self.drain_wake()
                elif self._listen is not None:
                    self._drain_notifies(selector)
                    self._claim_now = True

    def _work(self, now: float) -> None:
        """Claim, write outcomes and renew leases as they are due."""
        doing = "claiming and writing outcomes"
        try:
            claim = (
                self.stopping is Stopping.NO
                and self.inflight.free > 0
                and (self._claim_now or now >= self._next_poll)
            )
            if claim or self._due_flush(now):
                self._exchange(claim)
            if claim:
                self._next_poll = now + self.config.poll_interval
            if now >= self._next_heartbeat:
                doing = "renewing leases"
                self._heartbeat()
                self._next_heartbeat = now + self.config.heartbeat_interval
        except UNREACHABLE as exc:
            self._lost_database(exc, doing)

    def _outage_wait(self, now: float, next_status: float) -> float:
        """While the database is away only the next try, status, timeouts and a drain's end
        are due: not claims, flushes or heartbeats."""
        waits = [self._outage.next_try - now, next_status - now]
        if self.stopping is Stopping.DRAIN:
            waits.append(self._drain_deadline - now)
        if self.inflight.busy and self._timeouts:
            waits.append(self._next_timeout_check - now)
        return max(0.0, min(waits))

    def _next_wait(self, now: float, *deadlines: float) -> float:
        waits = [d - now for d in deadlines]
        first_done_at = self.inflight.first_done_at
        if first_done_at is not None:
            waits.append(first_done_at + self.config.completion_interval - now)
        if self.stopping is Stopping.DRAIN:
            waits.append(self._drain_deadline - now)
        if self.inflight.busy and self._timeouts:
            waits.append(self._next_timeout_check - now)
        if self._claim_now and self.inflight.free > 0 and self.stopping is Stopping.NO:
            waits.append(0.0)
        return max(0.0, min(waits))

    # -- the hot path ---------------------------------------------------------------------

    def _exchange(self, claim: bool) -> tuple[int, int]:
        """One round trip: complete what finished and, if there is room, claim more, in
        one transaction (one commit) through pipeline mode. Returns how many outcomes were
        sent and how many written (the others had lost their lease)."""
        batch = self.inflight.take()
        limit = self._claim_limit() if claim else 0
        if not batch and not limit:
            return 0, 0
        try:
            db = self._db()
            sent_at = time.monotonic()
            with self._watchdog.busy(db), db.transaction(), db.pipeline():
                completions = self.completer.send(db, batch) if batch else []
                if limit:
                    claimed = db.cursor()
                    claimed.execute(
                        self.sql.leases_claim,
                        {
                            "queue": self.config.queue,
                            "limit": limit,
                            "lease": self.config.lease,
                            "process_id": self.process_id,
                        },
                    )
        except UNREACHABLE:
            self.inflight.put_back(batch)  # not written: keep them for the next try
            raise
        written = 0
        if batch:
            written = self.completer.record(batch, completions)
            # A job retried or snoozed for less than a poll interval gets no NOTIFY when it
            # comes due: look again when it does rather than at the next poll.
            soon = [o.delay for o in batch if o.state == QUEUED and o.delay is not None]
            if soon:
                self._next_poll = min(self._next_poll, time.monotonic() + min(soon))
        if limit:
            rows = claimed.fetchall()
            # A full batch means there is probably more: claim again as soon as slots free.
            self._claim_now = len(rows) == limit
            self._start(rows, sent_at)
        self._set_title()
        return len(batch), written

    def _claim_limit(self) -> int:
        limit = self.inflight.free
        if self.config.max_jobs_per_process is not None:
            limit = min(limit, self.config.max_jobs_per_process - self._jobs_run)
        return max(0, limit)

    def _start(self, rows: list[tuple[Any, ...]], sent_at: float) -> None:
        """Hand claimed rows (whose claim was sent at `sent_at`) to the slots."""
        if not rows:
            return
        self._jobs_run += len(rows)
        policy, queue = self.executor.policy, self.config.queue
        jobs = [claimed_job(row, queue, self.registry, policy) for row in rows]
        self.inflight.start(jobs)  # before any slot can finish one
        self.leases.claimed(sent_at)
        claimed: Counter[str] = Counter()
        for job in jobs:
            claimed[job.task] += 1
            self._ready.put(job)
        self.joblog.started(jobs)
        for task, n in claimed.items():
            self.metrics.jobs_started.inc(queue, self.registry.metric_label(task), amount=n)
        self.metrics.queue_wait.observe_many(queue_waits(rows), queue)

    def _slot(self) -> None:
        while True:
            job = self._ready.get()
            if job is None:
                return
            if self.inflight.finish(self.executor.run(job)):
                self.wake()

    def _due_flush(self, now: float) -> bool:
        waiting = self.inflight.waiting
        if not waiting:
            return False
        if waiting >= self.config.completion_batch or self.stopping is not Stopping.NO:
            return True
        if self._claim_now or self.inflight.busy == 0:
            return True
        first = self.inflight.first_done_at
        return first is not None and now - first >= self.config.completion_interval

    def _heartbeat(self) -> None:
        """One statement: the process row, and with it the leases of every job held."""
        held = self.inflight.held()
        db = self._db()
        sent_at = time.monotonic()
        if not held:
            with self._watchdog.busy(db):
                self.heartbeat(db)
        else:
            metadata = self.metadata()
            with self._watchdog.busy(db):
                rows = db.execute(
                    self.sql.leases_renew,
                    {
                        "process_id": self.process_id,
                        "metadata": json.dumps(metadata),
                        "lease": self.config.lease,
                        "ids": int_array([j.id for j in held]),
                        "tokens": int_array([j.lease_token for j in held]),
                    },
                ).fetchall()
                if not rows:  # every lease lost: whether the row lives is not in the answer
                    self.heartbeat(db)
                elif not rows[0][1]:
                    self.row.removed(db, metadata)  # type: ignore[union-attr]
            renewed = {row[0] for row in rows}
            for job in held:
                if job.id not in renewed:
                    self._lose(job)
        self.leases.renewed(sent_at)

    def _lose(self, job: Job) -> None:
        """The job is no longer ours (reaped, cancelled): tell the task, write nothing."""
        self.inflight.lose(job)
        job.cancel(LEASE_LOST)
        log.warning(
            "lease lost: the job was cancelled or released; its outcome will not be written",
            extra=job.log_fields(),
        )

    def _soft_timeout(self, job: Job) -> float | None:
        spec = self.registry.get(job.task)
        if spec is not None and spec.timeout is not None:
            return spec.timeout
        return self.config.timeout

    def _check_timeouts(self, now: float) -> None:
        """Past the soft timeout a job is flagged cancelled; past soft + grace it is failed."""
        if not self._timeouts or not self.inflight.busy or now < self._next_timeout_check:
            return
        self._next_timeout_check = now + _TIMEOUT_CHECK_INTERVAL
        for job in self.inflight.running():
            soft = self._soft_timeout(job)
            if soft is None:
                continue
            elapsed = now - job.started_monotonic
            if elapsed >= soft + self.config.grace:
                self._time_out(job, soft + self.config.grace)
            elif elapsed >= soft:
                job.cancel("soft timeout")

    def _time_out(self, job: Job, limit: float) -> None:
        """Threads cannot be killed: record the timeout, stop claiming, and let the master
        replace this process once the other jobs are done."""
        if not self.inflight.time_out(job, lambda: self.executor.timed_out(job, limit)):
            return
        job.cancel("hard timeout")
        log.error(
            "job exceeded its hard timeout (%.1fs); recycling this worker process",
            limit,
            extra=job.log_fields(),
        )
        self._recycle("hard timeout")

    def _check_jobs_run(self) -> None:
        cap = self.config.max_jobs_per_process
        if cap is not None and self._jobs_run >= cap:
            self._recycle(f"ran {self._jobs_run} jobs (max_jobs_per_process)")

    def _check_memory(self) -> None:
        """Once a second with the status report, not on every wake-up: reading RSS is a
        file read, and the control thread wakes for every finished batch."""
        limit = self.config.max_memory
        if limit is not None:
            rss = _rss_bytes()
            if rss > limit:
                self._recycle(f"RSS {rss >> 20} MiB over max_memory {limit >> 20} MiB")

    def _recycle(self, reason: str) -> None:
        if self.stopping is not Stopping.NO:
            return
        log.info("recycling worker process: %s", reason, extra=self.fields())
        self._exit_code = EXIT_RECYCLE
        self.stop(Stopping.DRAIN)

    # -- reporting ------------------------------------------------------------------------

    def _set_title(self) -> None:
        """`worker emails#0 3/8`, and ` draining` once it claims no more (a stop, a roll)."""
        draining = " draining" if self.stopping is not Stopping.NO else ""
        self.on_title(
            f"worker {self.config.queue}#{self.config.index} "
            f"{self.inflight.busy}/{self.config.concurrency}{draining}"
        )

    def _report_status(self) -> None:
        busy = self.inflight.busy
        self.metrics.workers_busy.set(busy, self.config.queue)
        self.metrics.workers_slots.set(self.config.concurrency, self.config.queue)
        if self.sender is not None:
            self.send(
                Status(
                    busy=busy,
                    concurrency=self.config.concurrency,
                    metrics=self.metric_store.snapshot_delta(),
                )
            )

    # -- the end --------------------------------------------------------------------------

    def _shutdown(self) -> None:
        unfinished = self.inflight.abandon_running()
        for job in unfinished:
            job.cancel("worker shutting down")
        # Before their jobs are released: a released job may start elsewhere at once.
        end_programs(min(self.config.grace, _PROGRAM_GRACE_AT_EXIT))
        try:
            self._exchange(claim=False)
            if unfinished:
                self._release(unfinished)
            if self.process_id is not None:
                db = self._db()
                with self._watchdog.busy(db):
                    self.deregister(db)
        except (*UNREACHABLE, psycopg.Error) as exc:
            log.error(
                "could not write final state (%s): %d outcome(s) not written, %d running "
                "job(s) not released; their leases expire and the reaper hands them out again",
                first_line(exc),
                self.inflight.waiting,
                len(unfinished),
                extra=self.fields(),
            )
        self._report_status()
        for _ in self._threads:
            self._ready.put(None)
        self._close()
        log.info("worker stopped", extra=self.fields())

    def _close(self) -> None:
        with self._watchdog.closing():
            for conn in (self._listen, self._conn):
                if conn is not None:
                    conn.close()

    def _release(self, jobs: list[Job]) -> None:
        """Give the jobs back; which are at most once the database decides (job_policy), as
        the reaper does for jobs whose lease expired."""
        db = self._db()
        with self._watchdog.busy(db):
            rows = db.execute(
                self.sql.leases_release,
                {
                    "ids": int_array([j.id for j in jobs]),
                    "tokens": int_array([j.lease_token for j in jobs]),
                },
            ).fetchall()
        log.warning(
            "released %d unfinished job(s) at shutdown: %s",
            len(rows),
            ", ".join(str(r[0]) for r in rows),
            extra=self.fields(),
        )


def serve(
    config: WorkerConfig,
    *,
    imports: tuple[str, ...] = (),
    import_path: tuple[str, ...] = (),
    commands: Any = None,
    sender: Sender | None = None,
    parent_pid: int | None = None,
    on_title: Callable[[str], None] | None = None,
) -> int:
    """Everything a worker process does after it exists: load the tasks, handle signals,
    serve the queue. Returns the exit code."""
    from jobqd import tasks

    tasks.import_modules(imports, import_path)
    if commands:
        tasks.register_commands(commands, grace=config.grace)
    worker = Worker(config, tasks.registry, sender=sender, parent_pid=parent_pid, on_title=on_title)
    worker.install_signals()
    return worker.run()


def serve_child(child: ChildContext) -> int:
    """The worker role's entry for the master (jobqd.daemon.lifecycle.ROLES)."""
    settings = child.settings
    assert child.queue is not None
    return serve(
        WorkerConfig.from_settings(
            child.dsn, settings, child.queue, child.index, child.dead_workers
        ),
        imports=settings.imports,
        import_path=settings.import_path(),
        commands=settings.tasks,
        sender=child.sender,
        parent_pid=child.parent_pid,
        on_title=child.on_title,
    )

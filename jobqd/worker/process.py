"""The worker process: claims jobs of one queue, runs them on `concurrency` threads, keeps
their leases alive, and writes their outcomes in batches.

One control thread does every database round trip (claim, heartbeat, finish, release), so the
runner threads only ever run tasks. The control thread sleeps on one selector over the LISTEN
connection's socket and a wake-up pipe that signals and runner threads write to; it wakes for
a notification, a finished job, a signal, or the next deadline (heartbeat, poll, flush, drain).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue as queue_module
import selectors
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from jobqd.backoff import Backoff
from jobqd.daemon.ipc import Sender
from jobqd.observe.metrics import Registry as MetricsRegistry
from jobqd.observe.metrics import define_jobqd_metrics
from jobqd.store.connections import connect, subscribe
from jobqd.store.sql import int_array, queries
from jobqd.tasks import Job, Registry
from jobqd.worker.completer import send_acknowledge, written
from jobqd.worker.executor import QUEUED, SUCCEEDED, Executor, Outcome, Policy, claimed_job

log = logging.getLogger("jobqd.worker")

EXIT_RECYCLE = 10  # planned: the master replaces the process without backoff
_RECONNECT_PAUSE = 1.0
_STATUS_INTERVAL = 1.0
_TIMEOUT_CHECK_INTERVAL = 0.1


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
    shutdown_timeout: float
    statement_timeout: float
    orphans: tuple[int, ...] = ()  # process ids of this queue's workers the master saw die
    slot: int = 0

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat or self.lease / 3

    @classmethod
    def from_settings(
        cls, dsn: str, settings: Any, queue: str, slot: int = 0, orphans: tuple[int, ...] = ()
    ) -> WorkerConfig:
        q = settings.queues[queue]
        return cls(
            dsn=dsn,
            orphans=orphans,
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
            shutdown_timeout=settings.shutdown_timeout,
            statement_timeout=settings.database.statement_timeout,
            slot=slot,
        )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Worker:
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
        self.registry = registry
        self.sender = sender
        self.parent_pid = parent_pid
        self.on_title = on_title or (lambda title: None)
        self.sql = queries(config.schema)
        self.executor = Executor(
            registry, Policy(config.max_attempts, config.backoff, config.timeout)
        )
        self.metrics_registry = MetricsRegistry()
        self.metrics = define_jobqd_metrics(self.metrics_registry)

        self._lock = threading.Lock()
        self._running: dict[int, Job] = {}  # claimed, not finished by its thread
        self._done: list[Outcome] = []  # finished, outcome not yet written
        self._abandoned: set[int] = set()  # timed out: the thread's late result is ignored
        self._ready: queue_module.SimpleQueue[Job | None] = queue_module.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

        self._stopping: str | None = None  # None, "drain" or "fast"
        self._drain_deadline = 0.0
        self._exit_code = 0
        self._jobs_run = 0
        self._claim_now = True
        self._first_done_at: float | None = None
        self._next_poll = 0.0
        self._timeouts = config.timeout is not None or any(
            spec.timeout is not None for spec in registry.specs()
        )
        self._next_timeout_check = 0.0
        self.process_id: int | None = None
        self._conn: psycopg.Connection | None = None
        self._listen: psycopg.Connection | None = None
        self._listen_fd = -1
        self._threads: list[threading.Thread] = []

    # -- signals and wake-ups -------------------------------------------------------------

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self.stop("drain"))
        signal.signal(signal.SIGQUIT, lambda *_: self.stop("fast"))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master coordinates Ctrl-C
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def stop(self, how: str) -> None:
        """Drain: no new claims, running jobs may finish until shutdown_timeout. Fast: give
        running jobs back now. A second drain request becomes fast."""
        if how == "fast" or self._stopping == "drain":
            self._stopping = "fast"
        elif self._stopping is None:
            self._stopping = "drain"
            self._drain_deadline = time.monotonic() + self.config.shutdown_timeout
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    # -- connections ----------------------------------------------------------------------

    def _app_name(self) -> str:
        return f"jobqd worker {self.config.queue}#{self.config.slot}"

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(
                self.config.dsn,
                application_name=self._app_name(),
                statement_timeout_ms=int(self.config.statement_timeout * 1000),
            )
            self._conn.prepare_threshold = 0
        return self._conn

    def _drop_db(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _open_listen(self, selector: selectors.BaseSelector) -> None:
        try:
            conn = connect(self.config.dsn, application_name=self._app_name() + " listen")
            channel = conn.execute(self.sql.queues_channel, {"queue": self.config.queue}).fetchone()
            subscribe(conn, channel[0])
        except Exception as exc:
            log.warning("LISTEN unavailable, polling only: %s", exc, extra=self._fields())
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
            log.warning("LISTEN connection lost (%s); reconnecting", exc, extra=self._fields())
            selector.unregister(self._listen_fd)
            self._listen.close()
            self._listen = None

    def _fields(self) -> dict[str, Any]:
        return {"queue": self.config.queue, "slot": self.config.slot}

    # -- life -----------------------------------------------------------------------------

    def register(self) -> None:
        meta: dict[str, Any] = {"slot": self.config.slot}
        meta["concurrency"] = self.config.concurrency
        row = (
            self._db()
            .execute(
                self.sql.processes_register,
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "role": "worker",
                    "queue": self.config.queue,
                    "metadata": json.dumps(meta),
                },
            )
            .fetchone()
        )
        self.process_id = row[0]

    def take_back(self, process_ids: tuple[int, ...]) -> None:
        """Give back at once the jobs of predecessors the master saw die, rather than leave
        them to the reaper when their leases expire: a dead process cannot write any more.
        They go through the reaper's own statement, so retries, attempt limits and
        at-most-once delivery are decided exactly as for an expired lease."""
        db = self._db()
        with db.transaction():
            revoked = db.execute(self.sql.leases_revoke, {"process_ids": list(process_ids)})
            count = revoked.rowcount
            rows = db.execute(self.sql.leases_reap_expired, {"batch": max(count, 1)}).fetchall()
            for process_id in process_ids:
                db.execute(self.sql.processes_deregister, {"process_id": process_id})
        for job_id, queue, task, state, attempt in rows:
            log.warning(
                "job of a worker process that died taken back: %s",
                "dead (no attempts left or at-most-once)" if state == "dead" else "queued again",
                extra={"job_id": job_id, "queue": queue, "task": task, "attempt": attempt},
            )

    def sync_definitions(self) -> None:
        """Tell the database this queue's and these tasks' retry and delivery settings, which
        the reaper needs for jobs whose worker died, and the queue's events switch if the
        config sets it."""
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
            if spec.max_attempts is not None or spec.delivery is not None:
                db.execute(
                    self.sql.tasks_sync,
                    {
                        "name": spec.name,
                        "max_attempts": spec.max_attempts,
                        "delivery": spec.delivery,
                    },
                )

    def run(self) -> int:
        """Serve the queue until stopped; returns the process exit code."""
        if self.config.orphans:
            self.take_back(self.config.orphans)
        self.register()
        self.sync_definitions()
        if self.sender:
            self.sender.send("booted", process_id=self.process_id, queue=self.config.queue)
        log.info(
            "worker started: %d slots, lease %.0fs",
            self.config.concurrency,
            self.config.lease,
            extra=self._fields(),
        )
        for n in range(self.config.concurrency):
            thread = threading.Thread(target=self._slot, name=f"slot-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            self._loop()
        finally:
            self._shutdown()
        return self._exit_code

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._open_listen(selector)
        now = time.monotonic()
        next_heartbeat = now + self.config.heartbeat_interval
        self._next_poll = now
        next_status = now
        next_listen_retry = now + _RECONNECT_PAUSE
        while True:
            now = time.monotonic()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("master is gone; stopping", extra=self._fields())
                self._stopping = "fast"
            if self._stopping == "fast" or (
                self._stopping == "drain" and now >= self._drain_deadline
            ):
                return
            try:
                self._check_timeouts(now)
                claim = (
                    self._stopping is None
                    and self._free_slots() > 0
                    and (self._claim_now or now >= self._next_poll)
                )
                if claim or self._due_flush(now):
                    self._exchange(claim)
                if claim:
                    self._next_poll = now + self.config.poll_interval
                if now >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = now + self.config.heartbeat_interval
            except psycopg.OperationalError as exc:
                log.warning("database error (%s); reconnecting", exc, extra=self._fields())
                self._drop_db()
                self._sleep_interruptibly(_RECONNECT_PAUSE)
                continue
            if self._stopping == "drain" and not self._running and not self._done:
                return
            if self._listen is None and self._stopping is None and now >= next_listen_retry:
                self._open_listen(selector)
                next_listen_retry = now + _RECONNECT_PAUSE * 5
            if now >= next_status:
                self._report_status()
                self._check_memory()
                next_status = now + _STATUS_INTERVAL
            self._check_jobs_run()
            timeout = self._next_wait(now, next_heartbeat, self._next_poll, next_status)
            for key, _ in selector.select(timeout):
                if key.data == "wake":
                    self._drain_wake_pipe()
                elif self._listen is not None:
                    self._drain_notifies(selector)
                    self._claim_now = True

    def _next_wait(self, now: float, *deadlines: float) -> float:
        waits = [d - now for d in deadlines]
        if self._first_done_at is not None:
            waits.append(self._first_done_at + self.config.completion_interval - now)
        if self._stopping == "drain":
            waits.append(self._drain_deadline - now)
        if self._running and self._timeouts:
            waits.append(self._next_timeout_check - now)
        if self._claim_now and self._free_slots() > 0 and self._stopping is None:
            waits.append(0.0)
        return max(0.0, min(waits))

    def _sleep_interruptibly(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._stopping != "fast" and time.monotonic() < deadline:
            time.sleep(0.05)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _free_slots(self) -> int:
        return self.config.concurrency - len(self._running)

    # -- the hot path ---------------------------------------------------------------------

    def _exchange(self, claim: bool) -> None:
        """One round trip: acknowledge what finished and, if there is room, claim more, in
        one transaction (one commit) through pipeline mode."""
        with self._lock:
            batch, self._done = self._done, []
            self._first_done_at = None
        limit = self._claim_limit() if claim else 0
        db = self._db()
        try:
            with db.transaction(), db.pipeline():
                acks = send_acknowledge(db, self.sql, batch) if batch else []
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
        except psycopg.OperationalError:
            with self._lock:  # not written: keep them for the next try
                self._done[:0] = batch
                self._first_done_at = self._first_done_at or time.monotonic()
            raise
        if batch:
            self._count(batch, written(acks))
            # A job retried or snoozed for less than a poll interval gets no NOTIFY when it
            # comes due: look again when it does rather than at the next poll.
            soon = [o.delay for o in batch if o.state == QUEUED and o.delay is not None]
            if soon:
                self._next_poll = min(self._next_poll, time.monotonic() + min(soon))
        if limit:
            rows = claimed.fetchall()
            # A full batch means there is probably more: claim again as soon as slots free.
            self._claim_now = len(rows) == limit
            self._start(rows)
        self._set_title()

    def _claim_limit(self) -> int:
        limit = self._free_slots()
        if self.config.max_jobs_per_process is not None:
            limit = min(limit, self.config.max_jobs_per_process - self._jobs_run)
        return max(0, limit)

    def _start(self, rows: list[tuple[Any, ...]]) -> None:
        """Hand claimed rows to the slots."""
        if not rows:
            return
        self._jobs_run += len(rows)
        policy, queue = self.executor.policy, self.config.queue
        claimed: Counter[str] = Counter()
        with self._lock:
            for row in rows:
                job = claimed_job(row, queue, self.registry, policy)
                self._running[job.id] = job
                claimed[job.task] += 1
                self._ready.put(job)
        for task, n in claimed.items():
            self.metrics.jobs_started.inc(queue, task, amount=n)

    def _slot(self) -> None:
        while True:
            job = self._ready.get()
            if job is None:
                return
            outcome = self.executor.run(job)
            with self._lock:
                if job.id in self._abandoned:
                    self._abandoned.discard(job.id)
                    continue
                if self._running.pop(job.id, None) is None:
                    continue
                if job.cancelled and job.cancel_reason == "lease lost":
                    continue
                self._done.append(outcome)
                first = self._first_done_at is None
                if first:
                    self._first_done_at = time.monotonic()
            if first:
                self._wake()

    def _due_flush(self, now: float) -> bool:
        if not self._done:
            return False
        if len(self._done) >= self.config.completion_batch or self._stopping:
            return True
        if self._claim_now or self._free_slots() == self.config.concurrency:
            return True
        first = self._first_done_at
        return first is not None and now - first >= self.config.completion_interval

    def _count(self, batch: list[Outcome], written: set[int]) -> None:
        """Metrics for a written batch, one counter update per task rather than per job."""
        m, queue = self.metrics, self.config.queue
        tallies: dict[str, Counter[str]] = {}
        for o in batch:
            task = o.job.task
            m.job_duration.observe(o.duration, queue, task)
            if o.job.id not in written:
                log.warning(
                    "outcome dropped: the job's lease was lost (reaped or cancelled)",
                    extra=o.job.log_fields(),
                )
                continue
            tally = tallies.setdefault(task, Counter())
            if o.state == SUCCEEDED:
                tally["succeeded"] += 1
            elif not o.snooze:
                tally["failed"] += 1
                tally["retried" if o.state == QUEUED else "dead"] += 1
        for task, tally in tallies.items():
            for outcome, n in tally.items():
                counter = {
                    "succeeded": m.jobs_succeeded,
                    "failed": m.jobs_failed,
                    "retried": m.jobs_retried,
                    "dead": m.jobs_dead,
                }[outcome]
                counter.inc(queue, task, amount=n)

    def _heartbeat(self) -> None:
        with self._lock:
            held = [*self._running.values(), *(o.job for o in self._done)]
        meta = json.dumps({"slot": self.config.slot, "busy": len(self._running)})
        db = self._db()
        if not held:
            alive = db.execute(
                self.sql.processes_heartbeat, {"process_id": self.process_id, "metadata": meta}
            ).fetchone()
        else:
            rows = db.execute(
                self.sql.leases_renew,
                {
                    "process_id": self.process_id,
                    "metadata": meta,
                    "lease": self.config.lease,
                    "ids": int_array([j.id for j in held]),
                    "tokens": int_array([j.lease_token for j in held]),
                },
            ).fetchall()
            renewed = {row[0] for row in rows}
            alive = rows[0][1] if rows else None
            for job in held:
                if job.id not in renewed:
                    self._lose(job)
        if not alive:
            log.warning(
                "process row was removed (reaped?); registering again", extra=self._fields()
            )
            self.register()

    def _lose(self, job: Job) -> None:
        """The job is no longer ours (reaped, cancelled): tell the task, write nothing."""
        with self._lock:
            self._done = [o for o in self._done if o.job.id != job.id]
            if self._running.pop(job.id, None) is not None:
                self._abandoned.add(job.id)
        job.cancel("lease lost")
        log.warning(
            "lease lost: the job was cancelled or taken back; its outcome will not be written",
            extra=job.log_fields(),
        )

    def _soft_timeout(self, job: Job) -> float | None:
        spec = self.registry.get(job.task)
        if spec is not None and spec.timeout is not None:
            return spec.timeout
        return self.config.timeout

    def _check_timeouts(self, now: float) -> None:
        """Past the soft timeout a job is flagged cancelled; past soft + grace it is failed."""
        if not self._timeouts or not self._running or now < self._next_timeout_check:
            return
        self._next_timeout_check = now + _TIMEOUT_CHECK_INTERVAL
        with self._lock:
            running = list(self._running.values())
        for job in running:
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
        with self._lock:
            if self._running.pop(job.id, None) is None:
                return
            self._abandoned.add(job.id)
            self._done.append(self.executor.timed_out(job, limit))
            self._first_done_at = self._first_done_at or time.monotonic()
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
        if self._stopping:
            return
        log.info("recycling worker process: %s", reason, extra=self._fields())
        self._exit_code = EXIT_RECYCLE
        self.stop("drain")

    # -- reporting ------------------------------------------------------------------------

    def _set_title(self) -> None:
        self.on_title(
            f"worker {self.config.queue}#{self.config.slot} "
            f"{len(self._running)}/{self.config.concurrency}"
        )

    def _report_status(self) -> None:
        self.metrics.workers_busy.set(len(self._running), self.config.queue)
        if self.sender is None:
            return
        try:
            self.sender.send(
                "status",
                busy=len(self._running),
                concurrency=self.config.concurrency,
                metrics=self.metrics_registry.snapshot_delta(),
            )
        except OSError:
            log.warning("master pipe closed; stopping", extra=self._fields())
            self._stopping = "fast"

    # -- the end --------------------------------------------------------------------------

    def _shutdown(self) -> None:
        with self._lock:
            unfinished = list(self._running.values())
            self._running.clear()
            self._abandoned.update(j.id for j in unfinished)
        for job in unfinished:
            job.cancel("worker shutting down")
        try:
            self._exchange(claim=False)
            if unfinished:
                self._release(unfinished)
            if self.process_id is not None:
                self._db().execute(self.sql.processes_deregister, {"process_id": self.process_id})
        except psycopg.Error as exc:
            log.error(
                "could not write final state (%s); the reaper will release leftovers",
                exc,
                extra=self._fields(),
            )
        self._report_status()
        for _ in self._threads:
            self._ready.put(None)
        for conn in (self._listen, self._conn):
            if conn is not None:
                conn.close()
        log.info("worker stopped", extra=self._fields())

    def _release(self, jobs: list[Job]) -> None:
        at_most_once = [self._at_most_once(j) for j in jobs]
        rows = (
            self._db()
            .execute(
                self.sql.leases_release,
                {
                    "ids": int_array([j.id for j in jobs]),
                    "tokens": int_array([j.lease_token for j in jobs]),
                    "at_most_once": at_most_once,
                },
            )
            .fetchall()
        )
        log.warning(
            "released %d unfinished job(s) at shutdown: %s",
            len(rows),
            ", ".join(str(r[0]) for r in rows),
            extra=self._fields(),
        )

    def _at_most_once(self, job: Job) -> bool:
        spec = self.registry.get(job.task)
        delivery = spec.delivery if spec is not None and spec.delivery else self.config.delivery
        return delivery == "at_most_once"


def serve(
    config: WorkerConfig,
    *,
    imports: tuple[str, ...] = (),
    commands: Any = None,
    sender: Sender | None = None,
    parent_pid: int | None = None,
    on_title: Callable[[str], None] | None = None,
) -> int:
    """Everything a worker process does after it exists: load the tasks, handle signals,
    serve the queue. Returns the exit code."""
    from jobqd import tasks

    tasks.import_modules(imports)
    if commands:
        tasks.register_commands(commands)
    worker = Worker(config, tasks.registry, sender=sender, parent_pid=parent_pid, on_title=on_title)
    worker.install_signals()
    return worker.run()

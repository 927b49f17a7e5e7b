"""The reaper: releases the jobs of workers that are gone.

A running job whose lease expired goes back to `queued` (with a short backoff, its attempt
spent) or to `dead` when out of attempts or delivered at most once; its error names the worker
that lost it. Delivery and attempt limit come from the database's job_policy() (job, else task
or longest `prefix.*` route, else queue), the resolver a worker's own release uses too. A job
that workers released because none knew its task ends dead once it has been unhandled for
`unknown_task_window`. A process that stopped heartbeating for longer than `reaper.process_grace` is
removed, and its leases end at once rather than being left to expire; the master does the
same through `release` for a worker it saw die. Every statement works on a bounded batch and
is safe to run twice, or by two leaders at once (`SKIP LOCKED`, and each job's state is
re-checked under its row lock).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg

from jobqd.config.settings import Settings
from jobqd.maintenance.duty import Duty, Result
from jobqd.observe.metrics import JobqdMetrics
from jobqd.store.sql import Queries, queries

log = logging.getLogger("jobqd.reaper")

MAX_BATCHES = 20  # per pass: a backlog beyond batch * MAX_BATCHES waits for the next pass


class Released(NamedTuple):
    """A job whose lease was released, as leases_release_expired returns it."""

    job_id: int
    queue: str
    task: str
    state: str  # queued again, or dead
    attempt: int

    @property
    def outcome(self) -> str:
        if self.state == "dead":
            return "dead (no attempts left or at-most-once)"
        return "queued again"

    @property
    def fields(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "queue": self.queue,
            "task": self.task,
            "attempt": self.attempt,
        }


def release(
    conn: psycopg.Connection, sql: Queries, dead: Sequence[tuple[int, str | None]]
) -> list[Released]:
    """Release at once the running jobs of processes known to be dead, given as (process id,
    how it died or None): their leases end now and the expired-lease statement decides each
    job, so retries, attempt limits and at-most-once delivery come out exactly as for a lease
    that ran out, and each job's error says `worker process exited: HOW`. One transaction (a
    savepoint inside the caller's)."""
    by_reason: dict[str | None, list[int]] = {}
    for process_id, reason in dead:
        by_reason.setdefault(reason, []).append(process_id)
    released: list[Released] = []
    with conn.transaction():
        for reason, process_ids in by_reason.items():
            expired = conn.execute(sql.leases_expire_dead, {"process_ids": process_ids}).rowcount
            if expired:
                # The expired leases sort first (-infinity), so this batch is theirs.
                rows = conn.execute(
                    sql.leases_release_expired, {"batch": expired, "reason": reason}
                ).fetchall()
                released += [Released(*row) for row in rows]
    return released


@dataclass
class ReapPass:
    """What one pass did: jobs put back in line, jobs dead, processes removed."""

    queued: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    unhandled: list[int] = field(default_factory=list)  # ended dead: no worker knew the task

    def __bool__(self) -> bool:
        return bool(self.queued or self.dead or self.processes or self.unhandled)

    def add(self, jobs: list[Released], metrics: JobqdMetrics | None) -> None:
        for job in jobs:
            (self.dead if job.state == "dead" else self.queued).append(job.job_id)
            if metrics is not None:
                metrics.lease_expirations.inc(job.queue)
            log.warning("lease of a lost worker released: job %s", job.outcome, extra=job.fields)


def run_once(
    conn: psycopg.Connection, settings: Settings, *, metrics: JobqdMetrics | None = None
) -> ReapPass:
    """One reaper pass on `conn` (the leader session, autocommit)."""
    sql = queries(settings.database.schema)
    grace, batch = settings.reaper.process_grace, settings.reaper.batch
    result = ReapPass()
    with conn.transaction():
        silent = conn.execute(sql.processes_silent, {"grace": grace, "batch": batch}).fetchall()
        if silent:
            result.add(release(conn, sql, [(row[0], None) for row in silent]), metrics)
    for _ in range(MAX_BATCHES):
        rows = conn.execute(sql.leases_release_expired, {"batch": batch, "reason": None}).fetchall()
        result.add([Released(*row) for row in rows], metrics)
        if len(rows) < batch:
            break
    result.unhandled = end_unhandled(conn, sql, settings.unknown_task_window, batch)
    if silent:
        ids = [row[0] for row in silent]
        removed = conn.execute(sql.processes_remove, {"process_ids": ids, "grace": grace})
        result.processes = [row[0] for row in removed.fetchall()]
        for process_id, host, pid, role, queue, heartbeat_at in silent:
            if process_id in result.processes:
                log.warning(
                    "removed %s process %s (%s pid %s): no heartbeat since %s",
                    role,
                    process_id,
                    host,
                    pid,
                    heartbeat_at.isoformat(),
                    extra={"queue": queue} if queue else {},
                )
    return result


def end_unhandled(conn: psycopg.Connection, sql: Queries, window: float, batch: int) -> list[int]:
    """End dead the queued jobs that workers have released for `window` seconds because none
    knew their task; one ERROR line per job (rare: only a name no deploy brought)."""
    ended: list[int] = []
    for _ in range(MAX_BATCHES):
        rows = conn.execute(sql.leases_end_unhandled, {"window": window, "batch": batch}).fetchall()
        for job_id, queue, task, attempt, unhandled_for in rows:
            ended.append(job_id)
            log.error(
                "job dead: no worker knew its task for %.0fs (unknown_task_window); deploy a "
                "worker whose imports register it, then jobqctl retry %s",
                unhandled_for,
                job_id,
                extra={"job_id": job_id, "queue": queue, "task": task, "attempt": attempt},
            )
        if len(rows) < batch:
            break
    return ended


class Reaper(Duty):
    """The reaper duty, every `reaper.interval`."""

    name = "reaper"

    def run(self, conn: psycopg.Connection) -> Result:
        reaped = run_once(conn, self.settings, metrics=self.metrics)
        counts = {
            "queued": len(reaped.queued),
            "dead": len(reaped.dead),
            "processes": len(reaped.processes),
            "unhandled_dead": len(reaped.unhandled),
        }
        return Result(counts, self.settings.reaper.interval)

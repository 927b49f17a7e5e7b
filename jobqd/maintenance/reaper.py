"""The reaper: takes back the jobs of workers that are gone.

A running job whose lease expired goes back to `queued` (with a short backoff, its attempt
spent) or to `dead` when out of attempts or delivered at most once; its error names the worker
that lost it. A process that stopped heartbeating for longer than `reaper.process_grace` is
removed, and its leases are revoked at once rather than left to expire. Every statement works
on a bounded batch and is safe to run twice, or by two leaders at once (`SKIP LOCKED`, and each
job's state is re-checked under its row lock).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg

from jobqd.config.settings import Settings
from jobqd.observe.metrics import JobqdMetrics
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.reaper")

MAX_BATCHES = 20  # per pass: a backlog beyond batch * MAX_BATCHES waits for the next pass


@dataclass
class ReapPass:
    """What one pass did: jobs put back in line, jobs dead, processes removed."""

    queued: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.queued or self.dead or self.processes)


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
            conn.execute(sql.leases_revoke, {"process_ids": [row[0] for row in silent]})
    for _ in range(MAX_BATCHES):
        rows = conn.execute(sql.leases_reap_expired, {"batch": batch}).fetchall()
        for job_id, queue, task, state, attempt in rows:
            (result.dead if state == "dead" else result.queued).append(job_id)
            if metrics is not None:
                metrics.lease_expirations.inc(queue)
            log.warning(
                "lease of a lost worker taken back: job %s",
                "dead (no attempts left or at-most-once)" if state == "dead" else "queued again",
                extra={"job_id": job_id, "queue": queue, "task": task, "attempt": attempt},
            )
        if len(rows) < batch:
            break
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

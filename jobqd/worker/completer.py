"""Writing a batch of outcomes and counting what was written: the complete half of the
hot path, as River's jobcompleter is to its producer.

Plain successes (no result value), the bulk of any busy queue, go through a lean statement
that takes two integer arrays; jobs whose task this worker does not know are released by
their own statement; everything else goes through the general `finish` statement. All are
fenced on (id, lease_token, state = 'running') and are sent in pipeline mode, so they can
share one round trip with each other and with the worker's next claim. Arrays are sent as
literals built here, several times cheaper than adapting Python lists element by element.
"""

from __future__ import annotations

import logging
from collections import Counter

import psycopg

from jobqd.observe.metrics import JobqdMetrics
from jobqd.store.sql import Queries, float_array, int_array, text_array
from jobqd.tasks import Registry, registry
from jobqd.worker.executor import QUEUED, SUCCEEDED, UNHANDLED, Outcome
from jobqd.worker.joblog import JobLog

log = logging.getLogger("jobqd.worker")


def _bools(values: list[bool]) -> str:
    return "{" + ",".join("t" if v else "f" for v in values) + "}"


def send_completions(
    conn: psycopg.Connection, sql: Queries, batch: list[Outcome]
) -> list[psycopg.Cursor]:
    """Send the statements that write `batch`; read their results with `written()`. Inside
    `conn.pipeline()` this costs no round trip of its own."""
    plain: list[Outcome] = []
    other: list[Outcome] = []
    unhandled: list[Outcome] = []  # rare: a task this worker does not know
    for o in batch:
        if o.state == SUCCEEDED and o.result is None:
            plain.append(o)
        elif o.state == UNHANDLED:
            unhandled.append(o)
        else:
            other.append(o)
    cursors = []
    if plain:
        cursor = conn.cursor()
        cursor.execute(
            sql.leases_complete_succeeded,
            {
                "ids": int_array([o.job.id for o in plain]),
                "tokens": int_array([o.job.lease_token for o in plain]),
            },
        )
        cursors.append(cursor)
    if other:
        cursor = conn.cursor()
        cursor.execute(
            sql.leases_complete,
            {
                "ids": int_array([o.job.id for o in other]),
                "tokens": int_array([o.job.lease_token for o in other]),
                "states": text_array([o.state for o in other]),
                "delays": float_array([o.delay for o in other]),
                "results": text_array([o.result for o in other]),
                "errors": text_array([o.error for o in other]),
                "snoozes": _bools([o.snooze for o in other]),
            },
        )
        cursors.append(cursor)
    if unhandled:
        cursor = conn.cursor()
        cursor.execute(
            sql.leases_release_unknown,
            {
                "ids": int_array([o.job.id for o in unhandled]),
                "tokens": int_array([o.job.lease_token for o in unhandled]),
                "messages": text_array([o.error for o in unhandled]),
            },
        )
        cursors.append(cursor)
    return cursors


def written(cursors: list[psycopg.Cursor]) -> set[int]:
    """The ids actually written; the others had lost their lease."""
    return {row[0] for cursor in cursors for row in cursor.fetchall()}


def complete(conn: psycopg.Connection, sql: Queries, batch: list[Outcome]) -> set[int]:
    """Write the outcomes in one round trip; return the ids written."""
    with conn.pipeline():
        cursors = send_completions(conn, sql, batch)
    return written(cursors)


class Completer:
    """A worker's writer of outcomes: `send` inside the worker's pipeline (sharing its round
    trip with the next claim), then `record` once the results are in."""

    def __init__(
        self,
        sql: Queries,
        queue: str,
        metrics: JobqdMetrics,
        registry: Registry = registry,
        joblog: JobLog | None = None,
    ) -> None:
        self.sql = sql
        self.queue = queue
        self.metrics = metrics
        self.registry = registry
        self.joblog = joblog or JobLog()

    def send(self, conn: psycopg.Connection, batch: list[Outcome]) -> list[psycopg.Cursor]:
        return send_completions(conn, self.sql, batch)

    def record(self, batch: list[Outcome], cursors: list[psycopg.Cursor]) -> int:
        """Read what was written, count it (one counter update per task, not per job) and log
        each job's end (jobqd.worker.joblog). An outcome not written had lost its lease; that
        is logged, as it should be rare. Returns how many were written."""
        ids = written(cursors)
        m, queue = self.metrics, self.queue
        joblog, lines = self.joblog, self.joblog.wanted()
        tallies: dict[str, Counter[str]] = {}
        labels: dict[str, str] = {}  # job task -> metrics label, looked up once per batch
        for o in batch:
            task = labels.get(o.job.task)
            if task is None:
                task = labels[o.job.task] = self.registry.metric_label(o.job.task)
            m.job_duration.observe(o.duration, queue, task)
            if o.job.id not in ids:
                log.warning(
                    "outcome dropped: the job's lease was lost (reaped or cancelled)",
                    extra=o.job.log_fields(),
                )
                continue
            tally = tallies.setdefault(task, Counter())
            if o.state == SUCCEEDED:
                tally["succeeded"] += 1
                if lines:
                    joblog.ended(o, lines)
                continue
            if not o.snooze and o.state != UNHANDLED:
                tally["failed"] += 1
                tally["retried" if o.state == QUEUED else "dead"] += 1
            joblog.ended(o, lines)
        counters = {
            "succeeded": m.jobs_succeeded,
            "failed": m.jobs_failed,
            "retried": m.jobs_retried,
            "dead": m.jobs_dead,
        }
        for task, tally in tallies.items():
            for outcome, n in tally.items():
                counters[outcome].inc(queue, task, amount=n)
        return len(ids)

"""Helpers for testing applications that use jobqd.

Everything here runs jobs through the same Executor the worker uses (middleware, retry
decisions, Retry/Snooze/Discard), so a test sees what production would do:

- `run_job(task, args)` runs one job synchronously, without a database;
- `drain(dsn, queue)` claims and runs a queue's due jobs in this process until none is left,
  with the worker's own claim and finish statements;
- `InlineClient()` is a Client whose `enqueue` runs the task at once, without a database;
- `ignore=[...]` on drain() and InlineClient() discards jobs of chosen tasks (`emails.*`).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from jobqd import payload
from jobqd.daemon.lifecycle import ProcessRow
from jobqd.store.connections import session_conninfo
from jobqd.store.sql import queries
from jobqd.tasks import Job, Registry
from jobqd.tasks import registry as default_registry
from jobqd.worker.completer import complete
from jobqd.worker.executor import (
    DEAD,
    QUEUED,
    SUCCEEDED,
    Executor,
    Outcome,
    Policy,
    claimed_job,
    effective_max_attempts,
)

DEFAULT_POLICY = Policy()


@dataclass
class JobRun:
    """What became of a job run by these helpers."""

    id: int
    task: str
    args: Any
    state: str
    attempts: int
    result: Any = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    snoozes: int = 0


def _matches(task: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(task, p) for p in patterns)


def _result(outcome: Outcome) -> Any:
    return json.loads(outcome.result) if outcome.result is not None else None


def run_job(
    task: str,
    args: Any = None,
    *,
    registry: Registry = default_registry,
    policy: Policy = DEFAULT_POLICY,
    attempt: int = 1,
    max_attempts: int | None = None,
    queue: str = "default",
    job_id: int = 1,
) -> Outcome:
    """Run one attempt of `task` now, in this thread; returns the worker's Outcome
    (state 'succeeded', 'queued' for a retry or snooze, or 'dead')."""
    executor = Executor(registry, policy)
    job = Job(
        id=job_id,
        queue=queue,
        task=task,
        args=json.loads(payload.encode(args)),
        attempt=attempt,
        max_attempts=effective_max_attempts(max_attempts, registry.get(task), policy),
    )
    return executor.run(job)


MAX_SNOOZES = 100
"""Snoozes InlineClient runs through before it leaves a job queued."""


class InlineClient:
    """Stands in for Client in tests: enqueue() runs the job immediately, retrying at once
    (no waiting for backoff) until it succeeds or is dead. A job that snoozes `max_snoozes`
    times (snoozing spends no attempt, so nothing else ends it) is left `queued`, as it would
    wait in production. `runs` keeps every job."""

    def __init__(
        self,
        *,
        registry: Registry = default_registry,
        policy: Policy = DEFAULT_POLICY,
        ignore: Iterable[str] = (),
        max_snoozes: int = MAX_SNOOZES,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.ignore = tuple(ignore)
        self.max_snoozes = max_snoozes
        self.runs: list[JobRun] = []
        self._ids = itertools.count(1)

    def enqueue(self, task: str, args: Any = None, *, max_attempts: int | None = None, **_: Any):
        job_id = next(self._ids)
        data = json.loads(payload.encode(args))
        run = JobRun(id=job_id, task=task, args=data, state=QUEUED, attempts=0)
        self.runs.append(run)
        if _matches(task, self.ignore):
            run.state = "cancelled"
            return job_id
        limit = effective_max_attempts(max_attempts, self.registry.get(task), self.policy)
        while run.state == QUEUED and run.snoozes < self.max_snoozes:
            outcome = run_job(
                task,
                data,
                registry=self.registry,
                policy=self.policy,
                attempt=run.attempts + 1,
                max_attempts=limit,
                job_id=job_id,
            )
            if outcome.snooze:
                run.snoozes += 1
            else:
                run.attempts += 1
            if outcome.error:
                run.errors.append(json.loads(outcome.error))
            run.state = outcome.state
            run.result = _result(outcome)
        return job_id

    def enqueue_many(self, jobs: Iterable[Any], **kwargs: Any) -> list[int]:
        ids = []
        for item in jobs:
            if isinstance(item, Mapping):
                item = dict(item)
                ids.append(self.enqueue(item.pop("task"), item.pop("args", None), **item))
            else:
                ids.append(self.enqueue(item[0], item[1], **kwargs))
        return ids


def drain(
    dsn: str,
    queue: str = "default",
    *,
    schema: str = "jobqd",
    registry: Registry = default_registry,
    policy: Policy = DEFAULT_POLICY,
    ignore: Iterable[str] = (),
    lease: float = 60.0,
    batch: int = 100,
) -> dict[str, int]:
    """Run `queue`'s due jobs in this process until none is due; returns how many ended in
    each state. Retries due later (backoff) are left queued, as a worker would leave them."""
    sql = queries(schema)
    executor = Executor(registry, policy)
    ignore = tuple(ignore)
    counts: dict[str, int] = {}
    conninfo = session_conninfo(dsn, application_name="jobqd testing drain")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        registration = ProcessRow(sql, "inline", queue)
        process_id = registration.register(conn, {})
        try:
            while True:
                rows = conn.execute(
                    sql.leases_claim,
                    {"queue": queue, "limit": batch, "lease": lease, "process_id": process_id},
                ).fetchall()
                if not rows:
                    return counts
                outcomes = []
                for row in rows:
                    job = claimed_job(row, queue, registry, policy)
                    if _matches(job.task, ignore):
                        outcomes.append(Outcome(job, DEAD, error=_ignored(job)))
                    else:
                        outcomes.append(executor.run(job))
                complete(conn, sql, outcomes)
                for o in outcomes:
                    counts[o.state] = counts.get(o.state, 0) + 1
        finally:
            registration.deregister(conn)


def _ignored(job: Job) -> str:
    return json.dumps(
        {"attempt": job.attempt, "kind": "Ignored", "message": "ignored by jobqd.testing"}
    )


__all__ = ["DEAD", "QUEUED", "SUCCEEDED", "InlineClient", "JobRun", "drain", "run_job"]

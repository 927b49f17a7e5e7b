"""Retention: delete finished jobs, expired idempotency keys, old cron ticks and finished
bundles, in small batches, so the hot table stays small and no statement holds locks for long.

Succeeded and cancelled jobs go after `retention.succeeded`, dead ones after `retention.dead`,
each overridable per queue (`queues.NAME.retention`). The leader runs a pass every
`PRUNE_INTERVAL`, within `PRUNE_BUDGET`; `jobqctl prune` runs the same pass, unbounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

from jobqd.config.settings import Settings
from jobqd.maintenance.duty import Duty, Result
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.maintenance")  # where the leader has always logged this line

BATCH = 1000  # rows per statement: each is its own short transaction
PRUNE_INTERVAL = 30.0
PRUNE_BUDGET = 0.5  # seconds of pruning per pass, so cron ticks are never held up for long
PRUNE_BACKLOG_INTERVAL = 1.0  # a pass that used its whole budget continues this soon
PRUNE_FIRST_DELAY = 5.0  # after taking over: cron and the reaper first


class _Budget:
    """Stops a pass after `seconds` (None: never), between statements."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def _drain(step: Callable[[], int], batch: int, budget: _Budget) -> int:
    """Run `step` (one batch, returns rows deleted) until a short batch or the budget ends."""
    total = 0
    while not budget.spent():
        deleted = step()
        total += deleted
        if deleted < batch:
            break
    return total


def prune(
    conn: psycopg.Connection,
    settings: Settings,
    *,
    batch: int = BATCH,
    budget: float | None = None,
) -> dict[str, int]:
    """Delete what retention says is old; returns rows deleted per kind.

    `conn` must be in autocommit mode (each batch commits on its own). With `budget` seconds
    the pass stops early and the next one continues: the leader uses that to keep its tick.
    """
    sql = queries(settings.database.schema)
    limit = _Budget(budget)
    retention = settings.retention
    overrides = {name: q.retention for name, q in settings.queues.items()}
    ages = [retention.succeeded, retention.dead]
    ages += [age for o in overrides.values() for age in (o.succeeded, o.dead) if age is not None]
    params = {
        "queues": list(overrides),
        "succeeded_by_queue": [o.succeeded for o in overrides.values()],
        "dead_by_queue": [o.dead for o in overrides.values()],
        "succeeded": retention.succeeded,
        "dead": retention.dead,
        "shortest": min(ages),
        "batch": batch,
    }
    counts = {"succeeded": 0, "cancelled": 0, "dead": 0}

    def jobs() -> int:
        states = conn.execute(sql.retention_prune_jobs, params).fetchall()
        for (state,) in states:
            counts[state] += 1
        return len(states)

    _drain(jobs, batch, limit)

    def simple(statement: str, **params: float) -> Callable[[], int]:
        return lambda: conn.execute(statement, {**params, "batch": batch}).rowcount

    kept = max(retention.succeeded, retention.dead)
    counts["idempotency_keys"] = _drain(simple(sql.retention_prune_idempotency_keys), batch, limit)
    counts["cron_ticks"] = _drain(
        simple(sql.retention_prune_cron_ticks, age=retention.succeeded), batch, limit
    )
    counts["bundles"] = _drain(simple(sql.retention_prune_bundles, age=kept), batch, limit)
    return counts


def sync_settings(conn: psycopg.Connection, settings: Settings) -> bool:
    """Write the cluster-wide settings the database functions read (the idempotency window,
    from `retention.idempotency`); True when something changed. The leader calls it when it
    takes over, so the leader's config is the one in force."""
    sql = queries(settings.database.schema)
    cur = conn.execute(sql.retention_sync_settings, {"idempotency": settings.retention.idempotency})
    return cur.rowcount > 0


class Pruner(Duty):
    """The pruning duty: a budgeted pass every PRUNE_INTERVAL, or again soon while a backlog
    lasts."""

    name = "pruner"
    first_delay = PRUNE_FIRST_DELAY

    def run(self, conn: psycopg.Connection) -> Result:
        started = time.monotonic()
        deleted = prune(conn, self.settings, budget=PRUNE_BUDGET)
        if any(deleted.values()):
            log.info("pruned %s", ", ".join(f"{n} {kind}" for kind, n in deleted.items() if n))
        backlog = time.monotonic() - started >= PRUNE_BUDGET
        return Result(deleted, PRUNE_BACKLOG_INTERVAL if backlog else PRUNE_INTERVAL)

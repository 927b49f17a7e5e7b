"""Priority aging: queued jobs of a queue with `aging:` settings move forward in the claim
order the longer they wait, so a steady stream of urgent work cannot starve the rest.

A job that has waited `after` past its run_at gets its priority lowered (a lower number is
claimed first) by `step`, and by `step` again for every further `every`, but not below
`floor`. The target is computed from the priority the job was enqueued with (kept in
`jobs.base_priority`), so it does not matter how often the pass runs or who runs it.
"""

from __future__ import annotations

import logging
import math

import psycopg

from jobqd.config.settings import Settings
from jobqd.maintenance.duty import Duty, Result
from jobqd.observe.metrics import JobqdMetrics
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.maintenance")  # where the leader has always logged this line

MAX_BATCHES = 20


def run_once(conn: psycopg.Connection, settings: Settings, *, batch: int = 1000) -> dict[str, int]:
    """One aging pass over every queue with aging configured; returns jobs moved per queue."""
    sql = queries(settings.database.schema)
    moved: dict[str, int] = {}
    for queue, queue_settings in settings.queues.items():
        aging = queue_settings.aging
        if aging is None:
            continue
        params = {
            "queue": queue,
            "after": aging.after,
            "every": aging.every,
            "step": aging.step,
            "floor": aging.floor,
            "batch": batch,
        }
        total = 0
        for _ in range(MAX_BATCHES):
            count = conn.execute(sql.jobs_age_priorities, params).rowcount
            total += count
            if count < batch:
                break
        if total:
            moved[queue] = total
    return moved


def interval(settings: Settings) -> float | None:
    """How often aging needs to run: its finest `every`, between 1 s and 60 s; None when no
    queue ages."""
    everies = [q.aging.every for q in settings.queues.values() if q.aging is not None]
    return min(60.0, max(1.0, min(everies))) if everies else None


class Aging(Duty):
    """The aging duty, every `interval(settings)`; never due when no queue ages."""

    name = "aging"

    def __init__(self, settings: Settings, metrics: JobqdMetrics | None = None) -> None:
        super().__init__(settings, metrics)
        self.every = interval(settings)

    @property
    def enabled(self) -> bool:
        return self.every is not None

    def run(self, conn: psycopg.Connection) -> Result:
        moved = run_once(conn, self.settings)
        if moved:
            log.info("aged %s", ", ".join(f"{n} job(s) of {queue}" for queue, n in moved.items()))
        return Result(moved, math.inf if self.every is None else self.every)

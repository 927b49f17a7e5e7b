"""Queue gauges for /metrics, counted in the database by the leader: queued, running and
dead jobs per queue, and how long the oldest due job of each queue has waited.

Succeeded and cancelled jobs are not counted: they stay in the table only until pruned, and
counting them would read most of the table every few seconds; the jobqd_jobs_*_total
counters show that traffic."""

from __future__ import annotations

import psycopg

from jobqd.config import Settings
from jobqd.observe.metrics import JobqdMetrics
from jobqd.sql import queries


class QueueGauges:
    """Sets the gauges from the database, one statement per queue. Samples that disappeared
    are set back to 0, so the master (which keeps every sample a child ever wrote) does not
    show stale counts."""

    def __init__(self, metrics: JobqdMetrics) -> None:
        self.metrics = metrics
        self._counts: set[tuple[str, str]] = set()
        self._ages: set[str] = set()

    def update(self, conn: psycopg.Connection, settings: Settings) -> None:
        sql = queries(settings.database.schema)
        known = [name for (name,) in conn.execute(sql.known_queues).fetchall()]
        counts: dict[tuple[str, str], int] = {}
        ages: dict[str, float] = {}
        for queue in dict.fromkeys([*settings.queues, *known]):
            row = conn.execute(sql.queue_stats, {"queue": queue}).fetchone()
            assert row is not None
            queued, running, dead, oldest = row
            counts.update({(queue, "queued"): queued, (queue, "running"): running})
            counts[(queue, "dead")] = dead
            ages[queue] = max(0.0, float(oldest or 0))
        self._publish(counts, ages)

    def clear(self) -> None:
        """Zero everything this process reported (it is no longer the leader)."""
        self._publish({}, {})

    def _publish(self, counts: dict[tuple[str, str], int], ages: dict[str, float]) -> None:
        for labels in self._counts - counts.keys():
            self.metrics.queue_jobs.set(0, *labels)
        for queue in self._ages - ages.keys():
            self.metrics.queue_oldest_job_age.set(0, queue)
        for (queue, state), count in counts.items():
            self.metrics.queue_jobs.set(count, queue, state)
        for queue, age in ages.items():
            self.metrics.queue_oldest_job_age.set(age, queue)
        self._counts, self._ages = set(counts), set(ages)

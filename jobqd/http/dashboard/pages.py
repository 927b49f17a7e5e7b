"""The dashboard's pages: what each one reads, through the store functions jobqctl uses.

Each function takes one autocommit session and returns the template's data; none writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from jobqd.config.settings import Settings
from jobqd.store import admin, browse, bundles

PAGE_SIZE = 50
STATES = admin.STATES


@dataclass(frozen=True, slots=True)
class Source:
    """Where the pages read from: the schema, and the daemon's config when one is at hand
    (cron entries and per-node limits live only there)."""

    schema: str
    settings: Settings | None

    @property
    def stale_after(self) -> float:
        if self.settings is None:
            return admin.DEFAULT_STALE_AFTER
        return self.settings.reaper.process_grace

    @property
    def unknown_task_window(self) -> float:
        if self.settings is None:
            return admin.DEFAULT_UNKNOWN_TASK_WINDOW
        return self.settings.unknown_task_window


def overview(conn: psycopg.Connection, source: Source) -> dict[str, Any]:
    """Per queue: depth by state, the last hour, oldest waiting, pickup latency, pause and
    limits; the crash-looping children, the leader and unhandled tasks."""
    status = admin.status(
        conn,
        source.schema,
        stale_after=source.stale_after,
        unknown_task_window=source.unknown_task_window,
    )
    hour = browse.last_hour(conn, source.schema)
    pickup = browse.pickup(conn, source.schema)
    rows = browse.queue_rows(conn, source.schema)
    queues = []
    for queue in status["queues"]:
        name = queue["queue"]
        row = rows.get(name) or {}
        queues.append(
            {
                **queue,
                "chart": hour.get(name),
                "pickup": pickup.get(name),
                "paused_at": row.get("paused_at"),
                "paused_by": row.get("paused_by"),
                "paused_until": row.get("paused_until"),
                "max_attempts": row.get("max_attempts"),
                "delivery": row.get("delivery"),
                "node": _node_limits(source.settings, name),
            }
        )
    workers = [p for p in status["processes"] if p["role"] == "worker"]
    return {
        "time": status["time"],
        "queues": queues,
        "leader": status["leader"],
        "crash_loops": status["crash_loops"],
        "unhandled": status["unhandled"],
        "workers": len(workers),
        "stale": sum(1 for p in status["processes"] if p["stale"]),
    }


def _node_limits(settings: Settings | None, queue: str) -> dict[str, Any] | None:
    if settings is None or queue not in settings.queues:
        return None
    queue_settings = settings.queues[queue]
    return {"processes": queue_settings.processes, "concurrency": queue_settings.concurrency}


def jobs(
    conn: psycopg.Connection, source: Source, filters: browse.Filters, before: int | None
) -> dict[str, Any]:
    page = browse.jobs(conn, source.schema, filters, before=before, limit=PAGE_SIZE)
    names = sorted(browse.queue_rows(conn, source.schema))
    return {"page": page, "filters": filters, "queues": names, "states": STATES}


def job(conn: psycopg.Connection, source: Source, job_id: int) -> dict[str, Any] | None:
    found = admin.job(conn, source.schema, job_id)
    if found is None:
        return None
    bundle = None
    if found["bundle_id"] is not None:
        bundle = bundles.get(conn, source.schema, found["bundle_id"])
    return {"job": found, "bundle": bundle, "timings": _timings(found)}


def _timings(job: dict[str, Any]) -> list[tuple[str, float | None]]:
    """How long the job's last attempt waited to be claimed and ran, and its whole life.
    A queued job's started_at is an earlier attempt's, so it has no wait yet."""

    def between(start: Any, end: Any) -> float | None:
        return (end - start).total_seconds() if start and end else None

    claimed = job["started_at"] if job["state"] != "queued" else None
    return [
        ("waited for a slot", between(job["run_at"], claimed)),
        ("ran", between(job["started_at"], job["finished_at"])),
        ("created to finished", between(job["created_at"], job["finished_at"])),
    ]


def processes(conn: psycopg.Connection, source: Source) -> dict[str, Any]:
    status = admin.status(
        conn,
        source.schema,
        stale_after=source.stale_after,
        unknown_task_window=source.unknown_task_window,
    )
    return {
        "processes": status["processes"],
        "leader": status["leader"],
        "crash_loops": status["crash_loops"],
    }


def cron(conn: psycopg.Connection, source: Source) -> dict[str, Any]:
    from jobqd.maintenance import cron as cron_duty

    if source.settings is None:
        return {"entries": None}
    return {"entries": cron_duty.cron_status(conn, source.settings)}


def bundle_list(conn: psycopg.Connection, source: Source, unfinished: bool) -> dict[str, Any]:
    return {
        "bundles": bundles.newest(conn, source.schema, unfinished=unfinished, limit=100),
        "unfinished": unfinished,
    }

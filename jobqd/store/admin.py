"""What operators ask the database: queue status, processes, the leader, bulk changes.

Pure functions over an autocommit connection, shared by jobqctl and the http child, so the
command line, the JSON API and /metrics count the same way. Single job rows are
jobqd.store.jobs'; this module adds what an operator sees around them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from jobqd.store import jobs as job_rows
from jobqd.store.locks import pg_locks_parts
from jobqd.store.sql import queries

STATES = ("queued", "running", "succeeded", "dead", "cancelled")
RETRYABLE_STATES = ("dead", "cancelled")
CANCELLABLE_STATES = ("queued", "running")
DEFAULT_STALE_AFTER = 30.0
"""Seconds without a heartbeat after which a process is shown as stale (reaper.process_grace)."""


def _rows(conn: psycopg.Connection, statement: str, params: Any = None) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(statement, params).fetchall()


def queue_status(conn: psycopg.Connection, schema: str) -> list[dict[str, Any]]:
    """Per queue: paused, events, queued (due now), scheduled, retrying, running, dead,
    cancelled, succeeded_1h, per_minute (last 5 minutes) and oldest_age (seconds, or None)."""
    return _rows(conn, queries(schema).queues_status)


def processes(
    conn: psycopg.Connection, schema: str, *, stale_after: float = DEFAULT_STALE_AFTER
) -> list[dict[str, Any]]:
    """Registered processes by host, each with `heartbeat_age` and `stale`."""
    rows = _rows(conn, queries(schema).processes_list)
    for row in rows:
        row["stale"] = row["heartbeat_age"] > stale_after
    return rows


def leader(conn: psycopg.Connection, schema: str) -> dict[str, Any] | None:
    """The maintenance process holding the leader lock, read from pg_locks."""
    from jobqd.maintenance.leader import current_leader

    return current_leader(conn, schema)


def status(
    conn: psycopg.Connection, schema: str, *, stale_after: float = DEFAULT_STALE_AFTER
) -> dict[str, Any]:
    """Everything `jobqctl status` shows, as one JSON-ready document (datetimes aside)."""
    now = conn.execute(queries(schema).database_now).fetchone()[0]
    found = processes(conn, schema, stale_after=stale_after)
    return {
        "time": now,
        "queues": queue_status(conn, schema),
        "processes": found,
        "leader": leader(conn, schema),
        "crash_loops": crash_loops(found),
    }


def crash_loops(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The children crash-looping on each node, as its http process last wrote them into
    its row (the master has no database connection; see jobqd.http.server): host, child,
    role, queue, why (`crash_loop`), `last_exit` and `restarts`. Stale rows are left out."""
    loops = []
    for row in found:
        if row["role"] != "http" or row["stale"]:
            continue
        children = (row.get("metadata") or {}).get("children") or {}
        for name, child in sorted(children.items()):
            if isinstance(child, dict) and child.get("crash_looping"):
                loops.append(
                    {
                        "host": row["host"],
                        "child": name,
                        "role": child.get("role"),
                        "queue": child.get("queue"),
                        "crash_loop": child.get("crash_loop"),
                        "last_exit": child.get("last_exit"),
                        "restarts": child.get("restarts"),
                    }
                )
    return loops


def queue_depth(
    conn: psycopg.Connection, schema: str
) -> tuple[dict[tuple[str, str], int], dict[str, float]]:
    """({(queue, state): jobs} for the queued, running and dead jobs of every queue,
    {queue: seconds the oldest due job has waited}): the /metrics gauges.

    Each count is an index range scan. Succeeded and cancelled jobs are not counted: they stay
    only until pruned, counting them would read most of the table on every scrape, and the
    jobqd_jobs_*_total counters show that traffic."""
    depth: dict[tuple[str, str], int] = {}
    oldest: dict[str, float] = {}
    for queue, queued, running, dead, age in conn.execute(queries(schema).queues_gauges):
        depth.update({(queue, "queued"): queued, (queue, "running"): running})
        depth[(queue, "dead")] = dead
        oldest[queue] = max(0.0, float(age or 0))
    return depth, oldest


def job(conn: psycopg.Connection, schema: str, job_id: int) -> dict[str, Any] | None:
    """One job with every column, plus the process holding its lease, if any."""
    info = job_rows.get(conn, schema, job_id)
    if info is None:
        return None
    detail = dataclasses.asdict(info)
    detail["process"] = None
    if info.locked_by is not None:
        for process in processes(conn, schema):
            if process["id"] == info.locked_by:
                detail["process"] = process
    return detail


def jobs(
    conn: psycopg.Connection,
    schema: str,
    *,
    queue: str | None = None,
    state: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Newest first."""
    found = job_rows.newest(conn, schema, queue=queue, state=state, limit=limit)
    return [dataclasses.asdict(info) for info in found]


def retry(conn: psycopg.Connection, schema: str, ids: Sequence[int]) -> list[int]:
    """Put dead, cancelled or waiting jobs back in line now; returns the ids that were."""
    return [job_id for job_id in ids if job_rows.retry(conn, schema, job_id)]


def cancel(conn: psycopg.Connection, schema: str, ids: Sequence[int]) -> list[int]:
    """Cancel queued or running jobs; returns the ids that were."""
    return [job_id for job_id in ids if job_rows.cancel(conn, schema, job_id)]


def retry_queue(conn: psycopg.Connection, schema: str, queue: str, state: str) -> int:
    """Retry every job of `queue` in `state` (dead or cancelled); returns how many."""
    if state not in RETRYABLE_STATES:
        raise ValueError(f"can only retry dead or cancelled jobs in bulk, not {state}")
    return job_rows.retry_in_queue(conn, schema, queue, state)


def cancel_queue(conn: psycopg.Connection, schema: str, queue: str, state: str) -> int:
    """Cancel every job of `queue` in `state` (queued or running); returns how many."""
    if state not in CANCELLABLE_STATES:
        raise ValueError(f"can only cancel queued or running jobs, not {state}")
    return job_rows.cancel_in_queue(conn, schema, queue, state)


def lock_holder(conn: psycopg.Connection, schema: str, key: int) -> int | None:
    """The database backend pid holding advisory lock `key` (session level), or None."""
    row = conn.execute(queries(schema).locks_holder, pg_locks_parts(key)).fetchone()
    return None if row is None else int(row[0])

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

from jobqd.config.durations import format_duration
from jobqd.config.settings import DatabaseHealthSettings
from jobqd.store import jobs as job_rows
from jobqd.store.locks import pg_locks_parts
from jobqd.store.sql import queries

STATES = ("queued", "running", "succeeded", "dead", "cancelled")
RETRYABLE_STATES = ("dead", "cancelled")
CANCELLABLE_STATES = ("queued", "running")
DEFAULT_STALE_AFTER = 30.0
"""Seconds without a heartbeat after which a process is shown as stale (reaper.process_grace)."""
DEFAULT_UNKNOWN_TASK_WINDOW = 3600.0
"""unknown_task_window when no config is at hand."""


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
    conn: psycopg.Connection,
    schema: str,
    *,
    stale_after: float = DEFAULT_STALE_AFTER,
    unknown_task_window: float = DEFAULT_UNKNOWN_TASK_WINDOW,
) -> dict[str, Any]:
    """Everything `jobqctl status` shows, as one JSON-ready document (datetimes aside)."""
    now = conn.execute(queries(schema).database_now).fetchone()[0]
    holder = leader(conn, schema)
    listed = processes(conn, schema, stale_after=stale_after)
    for process in listed:  # from the lock, never from what a process says of itself
        process["leader"] = holder is not None and process["id"] == holder["id"]
    return {
        "time": now,
        "queues": queue_status(conn, schema),
        "processes": listed,
        "leader": holder,
        "crash_loops": crash_loops(listed),
        "rolls": rolls(listed),
        "unhandled": unhandled(conn, schema, unknown_task_window),
    }


def unhandled(conn: psycopg.Connection, schema: str, window: float) -> list[dict[str, Any]]:
    """Queued jobs that workers released because none knew their task, by queue and task:
    `jobs`, `unhandled_for` (seconds, the oldest) and `dead_in` (seconds until the oldest ends
    dead, counting `window`, the unknown_task_window)."""
    return _rows(conn, queries(schema).leases_unhandled, {"window": window})


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


def rolls(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The masters whose roll is under way, or whose workers run code of two rolls (a roll
    under way, or one that stopped): host, `master_pid`, `workers` (how many run each roll's
    code, by roll number; 0 is the code the master started with) and, when the node has an
    http child, the master's own account of its last roll (`roll`: number, state, replaced,
    total, replacing, where, error; see jobqd.daemon.roll). Stale rows are left out."""
    masters: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in found:
        metadata = row.get("metadata") or {}
        if row["stale"] or metadata.get("master_pid") is None:
            continue
        key = (row["host"], metadata["master_pid"])
        entry = masters.setdefault(
            key, {"host": key[0], "master_pid": key[1], "workers": {}, "roll": None}
        )
        if row["role"] == "worker":
            generation = str(metadata.get("generation", 0))
            entry["workers"][generation] = entry["workers"].get(generation, 0) + 1
        elif row["role"] == "http" and isinstance(metadata.get("roll"), dict):
            entry["roll"] = metadata["roll"]
    shown = []
    for entry in masters.values():
        active = (entry["roll"] or {}).get("state") in ("checking", "rolling")
        if active or len(entry["workers"]) > 1:
            shown.append(entry)
    return shown


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
    before: int | None = None,
) -> list[dict[str, Any]]:
    """Newest first; `before` pages on (ids below it)."""
    found = job_rows.newest(conn, schema, queue=queue, state=state, limit=limit, before=before)
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


# -- the database's own health ---------------------------------------------------------------


def database_health(
    conn: psycopg.Connection,
    schema: str,
    thresholds: DatabaseHealthSettings,
) -> dict[str, Any]:
    """The oldest holder of vacuum's horizon, dead rows and the last vacuum of each of the
    schema's tables, and one warning (saying what to do) per threshold exceeded.

    A pinned xmin makes every dead row in the jobs table stay until the holder ends, and claims
    slow down as they step over them; nothing else in jobqd would notice. Reads only statistics
    views, so it is safe on every scrape."""
    sql = queries(schema)
    holders = _rows(conn, sql.database_vacuum_holder)
    holder = holders[0] if holders else None
    tables = _rows(conn, sql.database_tables, {"schema": schema})
    held = holder is not None and _holds_too_long(holder, thresholds)
    return {
        "database": conn.execute(sql.database_name).fetchone()[0],
        "vacuum_holder": holder,
        "vacuum_held_back": held,
        "tables": tables,
        "thresholds": dataclasses.asdict(thresholds),
        "warnings": _health_warnings(holder if held else None, tables, thresholds),
    }


def _health_warnings(
    holder: dict[str, Any] | None, tables: list[dict[str, Any]], thresholds: DatabaseHealthSettings
) -> list[str]:
    """One line per threshold exceeded; `holder` is given only when it holds back too long."""
    warnings = []
    if holder is not None:
        warnings.append(
            f"{describe_holder(holder)} has held back vacuum for {_holder_age(holder)}: "
            f"dead jobs stay in the table and claims slow down until it ends; {_ending(holder)}"
        )
    for table in tables:
        if table["dead_tuples"] <= thresholds.dead_tuples:
            continue
        if table["vacuumed_at"] is None:
            last = "never vacuumed"
        else:
            last = f"last vacuumed {format_duration(int(table['vacuum_age']))} ago"
        advice = (
            "end the holder above, then run VACUUM on it"
            if holder is not None
            else "run VACUUM (VERBOSE) on it and check that autovacuum keeps up"
        )
        warnings.append(
            f"{table['table']} has {table['dead_tuples']:,} dead tuples "
            f"(over {thresholds.dead_tuples:,}; {last}): {advice}"
        )
    return warnings


def _holds_too_long(holder: dict[str, Any], thresholds: DatabaseHealthSettings) -> bool:
    if holder["age"] is not None:
        return holder["age"] > thresholds.holder_age
    return holder["xid_age"] > thresholds.holder_xid_age


def describe_holder(holder: dict[str, Any]) -> str:
    """`session pid 4242 (psql, idle in transaction, role app)`, or a prepared transaction's
    or a replication slot's name."""
    if holder["kind"] != "session":
        return f"{holder['kind']} {holder['name']!r} ({holder['state']})"
    details = [repr(holder["application_name"] or "")]
    details.append((holder["state"] or "-") if holder["visible"] else "state hidden from this role")
    if holder["role"]:
        details.append(f"role {holder['role']}")
    return f"session pid {holder['pid']} ({', '.join(details)})"


def _holder_age(holder: dict[str, Any]) -> str:
    xids = f"{holder['xid_age']:,} transactions"
    if holder["age"] is None:
        return xids
    return f"{format_duration(int(holder['age']))} ({xids})"


def _ending(holder: dict[str, Any]) -> str:
    if holder["kind"] == "prepared transaction":
        return "COMMIT PREPARED or ROLLBACK PREPARED it"
    if holder["kind"] == "replication slot":
        return "bring its standby back, or drop the slot if the standby is gone for good"
    return f"end that transaction, or pg_terminate_backend({holder['pid']})"

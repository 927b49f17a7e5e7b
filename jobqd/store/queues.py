"""Queues as the cluster shares them: pause and resume, on every node at once."""

from __future__ import annotations

from datetime import datetime

import psycopg

from jobqd.store.sql import queries


def pause(
    conn: psycopg.Connection,
    schema: str,
    queue: str,
    *,
    duration: float | None = None,
    paused_by: str | None = None,
) -> datetime | None:
    """Every node stops claiming from `queue` (its running jobs finish), until resumed or,
    with `duration` (seconds), until that much time has passed: the claim itself compares
    the pause's end with the database's clock, so nothing has to run to end it. `paused_by`
    says who, for `jobqctl status`. Returns when a timed pause ends."""
    sql = queries(schema)
    with conn.transaction():
        conn.execute(
            sql.queues_pause, {"queue": queue, "duration": duration, "paused_by": paused_by}
        )
        row = conn.execute(sql.queues_paused_until, {"queue": queue}).fetchone()
    return row[0] if row else None


def resume(conn: psycopg.Connection, schema: str, queue: str) -> None:
    conn.execute(queries(schema).queues_resume, {"queue": queue})


def known(conn: psycopg.Connection, schema: str, queue: str) -> bool:
    """Whether the cluster knows `queue`: served, configured, published by a task, or with
    jobs. Pausing an unknown name is almost always a typo."""
    row = conn.execute(queries(schema).queues_known, {"queue": queue}).fetchone()
    return bool(row and row[0])


def paused(conn: psycopg.Connection, schema: str, queue: str) -> dict[str, object]:
    """`paused` (now: a timed pause that ran out is not), `paused_until` and `paused_by`."""
    row = conn.execute(queries(schema).queues_paused, {"queue": queue}).fetchone()
    if row is None:
        return {"paused": False, "paused_until": None, "paused_by": None}
    return {"paused": bool(row[0]), "paused_until": row[1], "paused_by": row[2]}

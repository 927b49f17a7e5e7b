"""Queues as the cluster shares them: pause and resume, on every node at once."""

from __future__ import annotations

import psycopg

from jobqd.store.sql import queries


def pause(conn: psycopg.Connection, schema: str, queue: str) -> None:
    """Every node stops claiming from `queue` (its running jobs finish)."""
    conn.execute(queries(schema).queues_pause, {"queue": queue})


def resume(conn: psycopg.Connection, schema: str, queue: str) -> None:
    conn.execute(queries(schema).queues_resume, {"queue": queue})


def known(conn: psycopg.Connection, schema: str, queue: str) -> bool:
    """Whether the cluster knows `queue`: served, configured, published by a task, or with
    jobs. Pausing an unknown name is almost always a typo."""
    row = conn.execute(queries(schema).queues_known, {"queue": queue}).fetchone()
    return bool(row and row[0])

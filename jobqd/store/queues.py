"""Queues as the cluster shares them: pause and resume, on every node at once."""

from __future__ import annotations

import psycopg

from jobqd.store.sql import queries


def pause(conn: psycopg.Connection, schema: str, queue: str) -> None:
    """Every node stops claiming from `queue` (its running jobs finish)."""
    conn.execute(queries(schema).queues_pause, {"queue": queue})


def resume(conn: psycopg.Connection, schema: str, queue: str) -> None:
    conn.execute(queries(schema).queues_resume, {"queue": queue})

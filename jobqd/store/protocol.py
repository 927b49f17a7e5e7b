"""The worker protocol over a connection, for workers outside the daemon (the http child).

Each function calls one public SQL function of the protocol (migration 0006: claim, heartbeat,
complete, fail, snooze, discard), so an HTTP worker's claim is the Python worker's claim: the
same order, pause and lease tokens. An outcome returns the job's resulting row, or None when
the lease was lost and nothing was written. Server errors come out as `clean_errors` makes
them: the message and hint, never the statement or the row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from jobqd.store.jobs import clean_errors
from jobqd.store.sql import queries


def _one(conn: psycopg.Connection, statement: str, params: dict[str, Any]) -> dict[str, Any] | None:
    with clean_errors():
        return conn.cursor(row_factory=dict_row).execute(statement, params).fetchone()


def claim(
    conn: psycopg.Connection, schema: str, queue: str, max_jobs: int, lease: float, worker: str
) -> list[dict[str, Any]]:
    """Up to `max_jobs` due jobs of `queue`, each now running with its lease token."""
    params = {"queue": queue, "max": max_jobs, "lease": lease, "worker": worker}
    with clean_errors():
        cur = conn.cursor(row_factory=dict_row)
        return cur.execute(queries(schema).protocol_claim, params).fetchall()


def heartbeat(
    conn: psycopg.Connection,
    schema: str,
    ids: Sequence[int],
    tokens: Sequence[int],
    lease: float,
) -> list[dict[str, Any]]:
    """Renew the leases still held; the ids missing from the answer were lost."""
    params = {"ids": list(ids), "tokens": list(tokens), "lease": lease}
    with clean_errors():
        cur = conn.cursor(row_factory=dict_row)
        return cur.execute(queries(schema).protocol_heartbeat, params).fetchall()


def complete(
    conn: psycopg.Connection, schema: str, job_id: int, token: int, result: Any = None
) -> dict[str, Any] | None:
    encoded = None if result is None else json.dumps(result)
    params = {"id": job_id, "token": token, "result": encoded}
    return _one(conn, queries(schema).protocol_complete, params)


def fail(
    conn: psycopg.Connection,
    schema: str,
    job_id: int,
    token: int,
    error: str,
    *,
    retry_in: float | None = None,
    kind: str | None = None,
    traceback: str | None = None,
) -> dict[str, Any] | None:
    """Queued again after `retry_in` (None: the task's or queue's backoff), or dead when this
    was the last attempt."""
    params = {
        "id": job_id,
        "token": token,
        "error": error,
        "retry_in": retry_in,
        "kind": kind,
        "traceback": traceback,
    }
    return _one(conn, queries(schema).protocol_fail, params)


def snooze(
    conn: psycopg.Connection, schema: str, job_id: int, token: int, seconds: float
) -> dict[str, Any] | None:
    """Queued again after `seconds`, the attempt not spent."""
    params = {"id": job_id, "token": token, "seconds": seconds}
    return _one(conn, queries(schema).protocol_snooze, params)


def discard(
    conn: psycopg.Connection, schema: str, job_id: int, token: int, reason: str
) -> dict[str, Any] | None:
    """Dead at once."""
    params = {"id": job_id, "token": token, "reason": reason}
    return _one(conn, queries(schema).protocol_discard, params)

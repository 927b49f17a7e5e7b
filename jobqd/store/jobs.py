"""Job rows: enqueue (one, many), read, retry, cancel, delete, as plain functions over a
connection.

The one place job queries are run for the client, jobqctl, the http child and store.admin.
Each call runs in the connection's current transaction, as the caller left it: a caller that
wants several statements to commit together opens the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from jobqd import payload
from jobqd.store.sql import float_array, nullable_int_array, queries, text_array, timestamp_array
from jobqd.tasks import registry

# Rows per enqueue_many statement. Statements go out pipelined, so the server inserts one
# batch while this process encodes the next: 2,000 keeps both sides busy (50k jobs on 2 cores:
# 2,000 rows 166-177k jobs/s, 5,000 143k, 25,000 109k) and no statement holds locks for long.
_BATCH_ROWS = 2000


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job row as the client returns it."""

    id: int
    queue: str
    task: str
    args: Any
    state: str
    attempt: int
    max_attempts: int | None
    priority: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None
    locked_by: int | None
    last_error: str | None
    errors: list[dict[str, Any]]
    result: Any
    dedup_key: str | None
    idempotency_key: str | None
    bundle_id: int | None
    effective_max_attempts: int | None
    """The limit that applies: the job's, else its task's or route's, else its queue's (None:
    the configured default)."""


@contextmanager
def clean_errors() -> Iterator[None]:
    """Server errors as the caller may see them: the primary message and hint only.

    psycopg's message carries the server's DETAIL and CONTEXT, which name the failing row
    (payload included) and the statement inside the SQL API; neither is the caller's business.
    The error keeps its class and SQLSTATE.
    """
    try:
        yield
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        diag = exc.diag
        if diag.sqlstate is None or diag.message_primary is None:
            raise
        message = diag.message_primary + (f" ({diag.message_hint})" if diag.message_hint else "")
        clean = type(exc)(message)
        clean.sqlstate = diag.sqlstate
        raise clean from None


def route(task: str, queue: str | None) -> str | None:
    """The queue a job goes to when the caller named none: the registered task's or route's
    queue when this process imported it; None leaves it to the SQL API (the queue workers
    published for the task, else `default`)."""
    if queue is not None:
        return queue
    spec = registry.get(task)
    return spec.queue if spec is not None else None


def _seconds(delay: float | int | None) -> float | None:
    """A delay given as seconds or a timedelta, as float seconds."""
    if delay is None:
        return None
    if hasattr(delay, "total_seconds"):
        return float(delay.total_seconds())
    return float(delay)


def _scalar(conn: psycopg.Connection, statement: str, params: Mapping[str, Any]) -> Any:
    row = conn.execute(statement, params).fetchone()
    return row[0] if row else None


def enqueue(
    conn: psycopg.Connection,
    schema: str,
    task: str,
    args: Any = None,
    *,
    queue: str | None = None,
    delay: float | None = None,
    run_at: datetime | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    dedup_key: str | None = None,
    idempotency_key: str | None = None,
    bundle_id: int | None = None,
    max_payload_bytes: int = payload.DEFAULT_MAX_PAYLOAD_BYTES,
) -> int:
    """Enqueue one job and return its id (an existing job's id when deduplicated, or the
    first job's when another call already used `idempotency_key`)."""
    if delay is not None and run_at is not None:
        raise ValueError("give delay or run_at, not both")
    params = {
        "queue": route(task, queue),
        "task": task,
        "args": payload.encode(args, max_bytes=max_payload_bytes),
        "run_at": run_at,
        "delay": _seconds(delay) or 0.0,
        "priority": priority,
        "max_attempts": max_attempts,
        "dedup_key": dedup_key,
        "idempotency_key": idempotency_key,
        "bundle_id": bundle_id,
    }
    with clean_errors():
        return _scalar(conn, queries(schema).jobs_enqueue, params)


def enqueue_many(
    conn: psycopg.Connection,
    schema: str,
    jobs: Iterable[tuple[str, Any] | Mapping[str, Any]],
    *,
    queue: str | None = None,
    delay: float | None = None,
    run_at: datetime | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    bundle_id: int | None = None,
    max_payload_bytes: int = payload.DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[int]:
    """Enqueue many jobs in few statements; ids come back in input order.

    Each item is `(task, args)` or a dict of enqueue()'s keywords (task, args, queue,
    delay, run_at, priority, max_attempts, dedup_key, idempotency_key); the call's keywords
    fill the gaps. A job without a queue goes to its task's (see route()).
    """
    defaults = {
        "queue": queue,
        "delay": delay,
        "run_at": run_at,
        "priority": priority,
        "max_attempts": max_attempts,
    }
    statement = queries(schema).jobs_enqueue_many
    # Batches go out in pipeline mode: the server inserts one batch while this process
    # encodes the next.
    cursors = []
    with clean_errors(), conn.pipeline():
        for batch in _batches(jobs, defaults, max_payload_bytes, _BATCH_ROWS):
            cursor = conn.cursor()
            cursor.execute(statement, {**batch, "bundle_id": bundle_id})
            cursors.append(cursor)
    return [row[0] for cursor in cursors for row in cursor.fetchall()]


def get(conn: psycopg.Connection, schema: str, job_id: int) -> JobInfo | None:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(queries(schema).jobs_get, {"id": job_id}).fetchone()
    return JobInfo(**row) if row else None


def newest(
    conn: psycopg.Connection,
    schema: str,
    *,
    queue: str | None = None,
    state: str | None = None,
    limit: int = 100,
    before: int | None = None,
) -> list[JobInfo]:
    """Jobs of `queue` in `state` (None: any), newest first; with `before`, only ids below it
    (the next page after a page whose last id it is)."""
    cur = conn.cursor(row_factory=dict_row)
    params = {"queue": queue, "state": state, "limit": limit, "before": before}
    return [JobInfo(**row) for row in cur.execute(queries(schema).jobs_list, params).fetchall()]


def states(conn: psycopg.Connection, schema: str, ids: Sequence[int]) -> dict[int, str]:
    """The current state of each id that exists."""
    rows = conn.execute(queries(schema).jobs_states, {"ids": list(ids)}).fetchall()
    return {row[0]: row[1] for row in rows}


def count_in_state(conn: psycopg.Connection, schema: str, queue: str, state: str) -> int:
    return int(_scalar(conn, queries(schema).jobs_count_in_state, {"queue": queue, "state": state}))


def retry(conn: psycopg.Connection, schema: str, job_id: int) -> bool:
    """Put a dead, cancelled or waiting job back in line now; False if it was not one."""
    return bool(_scalar(conn, queries(schema).jobs_retry, {"id": job_id}))


def retry_in_queue(conn: psycopg.Connection, schema: str, queue: str, state: str) -> int:
    """Retry every job of `queue` in `state`; returns how many."""
    params = {"queue": queue, "state": state}
    return int(_scalar(conn, queries(schema).jobs_retry_in_queue, params))


def cancel(conn: psycopg.Connection, schema: str, job_id: int) -> bool:
    """Cancel a queued or running job; False if it was not one."""
    return bool(_scalar(conn, queries(schema).jobs_cancel, {"id": job_id}))


def cancel_in_queue(conn: psycopg.Connection, schema: str, queue: str, state: str) -> int:
    """Cancel every job of `queue` in `state` (queued or running); returns how many."""
    params = {"queue": queue, "state": state}
    return conn.execute(queries(schema).jobs_cancel_in_queue, params).rowcount


def delete(conn: psycopg.Connection, schema: str, ids: Sequence[int]) -> list[int]:
    """Delete jobs that are not running; returns the ids deleted."""
    rows = conn.execute(queries(schema).jobs_delete, {"ids": list(ids)}).fetchall()
    return sorted(row[0] for row in rows)


ENQUEUE_KEYS = frozenset(
    {
        "task",
        "args",
        "queue",
        "delay",
        "run_at",
        "priority",
        "max_attempts",
        "dedup_key",
        "idempotency_key",
    }
)
"""What an enqueue may name: enqueue()'s keywords, an enqueue_many item's, a POST /jobs body's."""


def split(item: tuple[str, Any] | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """An enqueue_many item as (task, enqueue()'s other keywords)."""
    if isinstance(item, Mapping):
        unknown = set(item) - ENQUEUE_KEYS
        if unknown or "task" not in item:
            raise ValueError(
                f"enqueue_many item {dict(item)!r}: needs 'task'"
                + (f", unknown keys {sorted(unknown)}" if unknown else "")
            )
        kwargs = dict(item)
        return kwargs.pop("task"), kwargs
    task, args = item
    return task, {"args": args}


def _batches(
    jobs: Iterable[tuple[str, Any] | Mapping[str, Any]],
    defaults: Mapping[str, Any],
    max_bytes: int,
    size: int,
) -> Iterator[dict[str, str]]:
    """Job fields gathered column by column, `size` jobs at a time, as the array literals
    enqueue_many takes. Literals built here cost a fraction of the driver adapting lists
    element by element, which was most of a bulk enqueue's time."""
    rows: list[tuple[Any, ...]] = []
    plain = (
        defaults["run_at"],
        _seconds(defaults["delay"]),
        defaults["priority"] or 0,
        defaults["max_attempts"],
        None,
        None,
    )
    routes: dict[str, str | None] = {}  # task -> queue, looked up once per name
    for item in jobs:
        if type(item) is tuple:  # (task, args): the call's keywords apply unchanged
            task, args = item
            queue = defaults["queue"]
            if queue is None:
                if task not in routes:
                    routes[task] = route(task, None)
                queue = routes[task]
            rows.append((task, payload.encode(args, max_bytes=max_bytes), queue, *plain))
        else:
            task, kwargs = split(item)
            merged = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
            if kwargs.get("delay") is not None and kwargs.get("run_at") is None:
                merged["run_at"] = None
            rows.append(
                (
                    task,
                    payload.encode(kwargs.get("args"), max_bytes=max_bytes),
                    route(task, merged["queue"]),
                    merged.get("run_at"),
                    _seconds(merged.get("delay")),
                    merged.get("priority") or 0,
                    merged.get("max_attempts"),
                    merged.get("dedup_key"),
                    merged.get("idempotency_key"),
                )
            )
        if len(rows) == size:
            yield _columns(rows)
            rows = []
    if rows:
        yield _columns(rows)


def _columns(rows: list[tuple[Any, ...]]) -> dict[str, str]:
    tasks, args, queues, run_ats, delays, priorities, max_attempts, dedup_keys, idem_keys = zip(
        *rows, strict=True
    )
    return {
        "tasks": text_array(list(tasks)),
        "args": text_array(list(args)),
        "queues": text_array(list(queues)),
        "run_ats": timestamp_array(list(run_ats)),
        "delays": float_array(list(delays)),
        "priorities": nullable_int_array(list(priorities)),
        "max_attempts": nullable_int_array(list(max_attempts)),
        "dedup_keys": text_array(list(dedup_keys)),
        "idempotency_keys": text_array(list(idem_keys)),
    }

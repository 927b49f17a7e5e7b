"""The Python client: enqueue jobs (alone, in batches, in bundles) and look at them.

Every call goes through the SQL API in the schema (`jobqd.enqueue`, ...), so the Python client
and any other language see the same validation and dedup rules. Given `conn=`, a call runs in
the caller's own psycopg connection and transaction: a rollback there un-enqueues the job.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from jobqd import payload
from jobqd.errors import DatabaseUnavailable
from jobqd.store.connections import connect, resolve_url, session_conninfo
from jobqd.store.sql import (
    float_array,
    nullable_int_array,
    queries,
    text_array,
    timestamp_array,
)

# Rows per enqueue_many statement. Statements go out pipelined, so the server inserts one
# batch while this process encodes the next: 2,000 keeps both sides busy (50k jobs on 2 cores:
# 2,000 rows 166-177k jobs/s, 5,000 143k, 25,000 109k) and no statement holds locks for long.
_BATCH_ROWS = 2000
_CONNECT_TIMEOUT = 10.0  # seconds the first use of a Client waits for its first session


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


@dataclass(frozen=True, slots=True)
class BundleInfo:
    id: int
    name: str | None
    total: int
    succeeded: int
    dead: int
    cancelled: int
    callback_task: str | None
    callback_queue: str | None
    callback_job_id: int | None
    created_at: datetime
    finished_at: datetime | None

    @property
    def done(self) -> bool:
        return self.finished_at is not None


def _seconds(delay: float | int | None) -> float | None:
    if delay is None:
        return None
    if hasattr(delay, "total_seconds"):
        return float(delay.total_seconds())
    return float(delay)


class Client:
    """Enqueue and inspect jobs. Thread-safe; opens a small connection pool on first use."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "jobqd",
        max_payload_bytes: int = payload.DEFAULT_MAX_PAYLOAD_BYTES,
        pool_size: int = 4,
    ) -> None:
        self._dsn = dsn or os.environ.get("JOBQD_DATABASE_URL") or "embedded"
        self.schema = schema
        self.max_payload_bytes = max_payload_bytes
        self._sql = queries(schema)
        self._pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _connection(self, conn: psycopg.Connection | None) -> Iterator[psycopg.Connection]:
        if conn is not None:
            yield conn
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = self._open_pool()
        with self._pool.connection() as pooled:
            yield pooled

    def _open_pool(self) -> ConnectionPool:
        """A pool whose first session is up before it serves: a request arriving while it
        still connects makes it open a second session, and a pool alternating between two
        sessions serves a one-at-a-time caller about 10% slower than one that keeps one."""
        url = resolve_url(self._dsn)
        pool = ConnectionPool(
            session_conninfo(url, application_name="jobqd client"),
            min_size=1,
            max_size=self._pool_size,
            kwargs={"autocommit": True},
            open=True,
            name="jobqd-client",
        )
        try:
            pool.wait(timeout=_CONNECT_TIMEOUT)
        except PoolTimeout:
            pool.close()
            # Connect once more in the foreground for the server's own reason.
            connect(url, application_name="jobqd client").close()
            raise DatabaseUnavailable(
                f"no connection to PostgreSQL within {_CONNECT_TIMEOUT:.0f}s "
                "(check database.url / JOBQD_DATABASE_URL)"
            ) from None
        return pool

    def _scalar(self, statement: str, params: Mapping[str, Any], conn: Any) -> Any:
        with self._connection(conn) as c:
            row = c.execute(statement, params).fetchone()
        return row[0] if row else None

    def enqueue(
        self,
        task: str,
        args: Any = None,
        *,
        queue: str = "default",
        delay: float | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        dedup_key: str | None = None,
        idempotency_key: str | None = None,
        conn: psycopg.Connection | None = None,
        _bundle_id: int | None = None,
    ) -> int:
        """Enqueue one job and return its id (an existing job's id when deduplicated)."""
        if delay is not None and run_at is not None:
            raise ValueError("give delay or run_at, not both")
        params = {
            "queue": queue,
            "task": task,
            "args": payload.encode(args, max_bytes=self.max_payload_bytes),
            "run_at": run_at,
            "delay": _seconds(delay) or 0.0,
            "priority": priority,
            "max_attempts": max_attempts,
            "dedup_key": dedup_key,
            "idempotency_key": idempotency_key,
            "bundle_id": _bundle_id,
        }
        return self._scalar(self._sql.jobs_enqueue, params, conn)

    def enqueue_many(
        self,
        jobs: Iterable[tuple[str, Any] | Mapping[str, Any]],
        *,
        queue: str = "default",
        delay: float | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        conn: psycopg.Connection | None = None,
    ) -> list[int]:
        """Enqueue many jobs in few statements; ids come back in input order.

        Each item is `(task, args)` or a dict of enqueue()'s keywords (task, args, queue,
        delay, run_at, priority, max_attempts, dedup_key); the call's keywords fill the gaps.
        """
        defaults = {
            "queue": queue,
            "delay": delay,
            "run_at": run_at,
            "priority": priority,
            "max_attempts": max_attempts,
        }
        # Batches go out in pipeline mode: the server inserts one batch while this process
        # encodes the next, and all of them commit together (or not at all).
        cursors = []
        with self._connection(conn) as c:
            with c.transaction() if conn is None else _nothing(), c.pipeline():
                for batch in _batches(jobs, defaults, self.max_payload_bytes, _BATCH_ROWS):
                    cursor = c.cursor()
                    cursor.execute(self._sql.jobs_enqueue_many, batch)
                    cursors.append(cursor)
            return [row[0] for cursor in cursors for row in cursor.fetchall()]

    def enqueue_bundle(
        self,
        jobs: Sequence[tuple[str, Any] | Mapping[str, Any]],
        *,
        queue: str = "default",
        name: str | None = None,
        callback: str | None = None,
        callback_args: Any = None,
        callback_queue: str | None = None,
        conn: psycopg.Connection | None = None,
    ) -> tuple[int, list[int]]:
        """Enqueue jobs as one bundle; when all have ended, `callback` is enqueued once with
        `callback_args` plus a `bundle` key holding the counts. Returns (bundle id, job ids)."""
        with self._connection(conn) as c, c.transaction():
            bundle_id = c.execute(
                self._sql.bundles_create,
                {
                    "total": len(jobs),
                    "name": name,
                    "callback_task": callback,
                    "callback_queue": callback_queue or queue,
                    "callback_args": payload.encode(callback_args),
                },
            ).fetchone()[0]
            ids = []
            for item in jobs:
                task, kwargs = _split(item)
                kwargs.setdefault("queue", queue)
                ids.append(self.enqueue(task, conn=c, _bundle_id=bundle_id, **kwargs))
        return bundle_id, ids

    def get_bundle(self, bundle_id: int, *, conn: psycopg.Connection | None = None):
        with self._connection(conn) as c:
            cur = c.cursor(row_factory=dict_row)
            row = cur.execute(self._sql.bundles_get, {"id": bundle_id}).fetchone()
        return BundleInfo(**row) if row else None

    def get(self, job_id: int, *, conn: psycopg.Connection | None = None) -> JobInfo | None:
        with self._connection(conn) as c:
            cur = c.cursor(row_factory=dict_row)
            row = cur.execute(self._sql.jobs_get, {"id": job_id}).fetchone()
        return JobInfo(**row) if row else None

    def list(
        self,
        queue: str | None = None,
        state: str | None = None,
        limit: int = 100,
        *,
        conn: psycopg.Connection | None = None,
    ) -> list[JobInfo]:
        """Newest first."""
        with self._connection(conn) as c:
            cur = c.cursor(row_factory=dict_row)
            rows = cur.execute(
                self._sql.jobs_list, {"queue": queue, "state": state, "limit": limit}
            ).fetchall()
        return [JobInfo(**row) for row in rows]

    def retry(self, job_id: int, *, conn: psycopg.Connection | None = None) -> bool:
        return bool(self._scalar(self._sql.jobs_retry, {"id": job_id}, conn))

    def retry_queue(
        self, queue: str, state: str = "dead", *, conn: psycopg.Connection | None = None
    ) -> int:
        return int(
            self._scalar(self._sql.jobs_retry_in_queue, {"queue": queue, "state": state}, conn)
        )

    def cancel(self, job_id: int, *, conn: psycopg.Connection | None = None) -> bool:
        return bool(self._scalar(self._sql.jobs_cancel, {"id": job_id}, conn))

    def pause(self, queue: str, *, conn: psycopg.Connection | None = None) -> None:
        self._scalar(self._sql.queues_pause, {"queue": queue}, conn)

    def resume(self, queue: str, *, conn: psycopg.Connection | None = None) -> None:
        self._scalar(self._sql.queues_resume, {"queue": queue}, conn)

    def listen(self, callback=None, *, queues=None, timeout=None):
        """Job and bundle end events (jobqd.events): an iterator of events, or, given
        `callback`, call it for each until `timeout` seconds pass and return the count."""
        from jobqd import events

        stream = events.listen(resolve_url(self._dsn), self.schema, queues=queues, timeout=timeout)
        return stream if callback is None else events.dispatch(stream, callback)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


_ITEM_KEYS = {"task", "args", "queue", "delay", "run_at", "priority", "max_attempts", "dedup_key"}


def _split(item: tuple[str, Any] | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(item, Mapping):
        unknown = set(item) - _ITEM_KEYS
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
        defaults["queue"],
        defaults["run_at"],
        _seconds(defaults["delay"]),
        defaults["priority"] or 0,
        defaults["max_attempts"],
        None,
    )
    for item in jobs:
        if type(item) is tuple:  # (task, args): the call's keywords apply unchanged
            task, args = item
            rows.append((task, payload.encode(args, max_bytes=max_bytes), *plain))
        else:
            task, kwargs = _split(item)
            merged = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
            if kwargs.get("delay") is not None and kwargs.get("run_at") is None:
                merged["run_at"] = None
            rows.append(
                (
                    task,
                    payload.encode(kwargs.get("args"), max_bytes=max_bytes),
                    merged["queue"],
                    merged.get("run_at"),
                    _seconds(merged.get("delay")),
                    merged.get("priority") or 0,
                    merged.get("max_attempts"),
                    merged.get("dedup_key"),
                )
            )
        if len(rows) == size:
            yield _columns(rows)
            rows = []
    if rows:
        yield _columns(rows)


def _columns(rows: list[tuple[Any, ...]]) -> dict[str, str]:
    tasks, args, queues, run_ats, delays, priorities, max_attempts, dedup_keys = zip(
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
    }

"""The Python client: enqueue jobs (alone, in batches, in bundles) and look at them.

Every call goes through the SQL API in the schema (`jobqd.enqueue`, ...), so the Python client
and any other language see the same validation and dedup rules. The statements themselves are
run by the plain functions in jobqd.store (jobs, bundles, queues), which jobqctl and the http
child call too; the client owns its connection pool. Given `conn=`, a call runs in the
caller's own psycopg connection and transaction: a rollback there un-enqueues the job.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from jobqd import payload
from jobqd.errors import DatabaseUnavailable
from jobqd.store import bundles, queues
from jobqd.store import jobs as job_rows  # `jobs` is a parameter name of the public API
from jobqd.store.bundles import BundleInfo
from jobqd.store.connections import connect, resolve_url, session_conninfo
from jobqd.store.jobs import JobInfo

__all__ = ["BundleInfo", "Client", "JobInfo"]

_CONNECT_TIMEOUT = 10.0  # seconds the first use of a Client waits for its first session


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

    def enqueue(
        self,
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
        conn: psycopg.Connection | None = None,
    ) -> int:
        """Enqueue one job and return its id (an existing job's id when deduplicated or
        when the idempotency key was used before, also by a concurrent call).

        Without `queue`, the job goes to its task's queue: the registered task's or route's
        when this process imported it, else the one workers published for it, else
        `default`."""
        with self._connection(conn) as c:
            return job_rows.enqueue(
                c,
                self.schema,
                task,
                args,
                queue=queue,
                delay=delay,
                run_at=run_at,
                priority=priority,
                max_attempts=max_attempts,
                dedup_key=dedup_key,
                idempotency_key=idempotency_key,
                max_payload_bytes=self.max_payload_bytes,
            )

    def enqueue_many(
        self,
        jobs: Iterable[tuple[str, Any] | Mapping[str, Any]],
        *,
        queue: str | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        conn: psycopg.Connection | None = None,
    ) -> list[int]:
        """Enqueue many jobs in few statements; ids come back in input order.

        Each item is `(task, args)` or a dict of enqueue()'s keywords (task, args, queue,
        delay, run_at, priority, max_attempts, dedup_key, idempotency_key); the call's
        keywords fill the gaps. Without a queue, a job goes to its task's, as in enqueue().
        """
        # On the client's own session all batches commit together (or not at all); on the
        # caller's, as its transaction does.
        with self._connection(conn) as c, c.transaction() if conn is None else nullcontext():
            return job_rows.enqueue_many(
                c,
                self.schema,
                jobs,
                queue=queue,
                delay=delay,
                run_at=run_at,
                priority=priority,
                max_attempts=max_attempts,
                max_payload_bytes=self.max_payload_bytes,
            )

    def enqueue_bundle(
        self,
        jobs: Sequence[tuple[str, Any] | Mapping[str, Any]],
        *,
        queue: str | None = None,
        name: str | None = None,
        callback: str | None = None,
        callback_args: Any = None,
        callback_queue: str | None = None,
        conn: psycopg.Connection | None = None,
    ) -> tuple[int, list[int]]:
        """Enqueue jobs as one bundle; when all have ended, `callback` is enqueued once with
        `callback_args` plus a `bundle` key holding the counts. Returns (bundle id, job ids).

        An empty bundle finishes at once; a job cancelled or deleted counts as cancelled; a
        job whose dedup or idempotency key matches another job is refused (the whole bundle
        is not enqueued)."""
        with self._connection(conn) as c:
            return bundles.enqueue(
                c,
                self.schema,
                jobs,
                queue=queue,
                name=name,
                callback=callback,
                callback_args=callback_args,
                callback_queue=callback_queue,
                max_payload_bytes=self.max_payload_bytes,
            )

    def get_bundle(
        self, bundle_id: int, *, conn: psycopg.Connection | None = None
    ) -> BundleInfo | None:
        with self._connection(conn) as c:
            return bundles.get(c, self.schema, bundle_id)

    def get(self, job_id: int, *, conn: psycopg.Connection | None = None) -> JobInfo | None:
        with self._connection(conn) as c:
            return job_rows.get(c, self.schema, job_id)

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
            return job_rows.newest(c, self.schema, queue=queue, state=state, limit=limit)

    def retry(self, job_id: int, *, conn: psycopg.Connection | None = None) -> bool:
        with self._connection(conn) as c:
            return job_rows.retry(c, self.schema, job_id)

    def retry_queue(
        self, queue: str, state: str = "dead", *, conn: psycopg.Connection | None = None
    ) -> int:
        with self._connection(conn) as c:
            return job_rows.retry_in_queue(c, self.schema, queue, state)

    def cancel(self, job_id: int, *, conn: psycopg.Connection | None = None) -> bool:
        with self._connection(conn) as c:
            return job_rows.cancel(c, self.schema, job_id)

    def pause(
        self,
        queue: str,
        *,
        duration: float | None = None,
        paused_by: str | None = None,
        conn: psycopg.Connection | None = None,
    ) -> None:
        """Stop every node claiming from `queue`, for `duration` seconds or until resumed."""
        with self._connection(conn) as c:
            queues.pause(c, self.schema, queue, duration=duration, paused_by=paused_by)

    def resume(self, queue: str, *, conn: psycopg.Connection | None = None) -> None:
        with self._connection(conn) as c:
            queues.resume(c, self.schema, queue)

    def listen(self, callback=None, *, queues=None, timeout=None):
        """Job and bundle end events (jobqd.events): an iterator of events, or, given
        `callback`, call it for each until `timeout` seconds pass and return the count."""
        from jobqd import events

        stream = events.listen(resolve_url(self._dsn), self.schema, queues=queues, timeout=timeout)
        return stream if callback is None else events.dispatch(stream, callback)

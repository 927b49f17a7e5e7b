"""Bundles: groups of jobs whose last end enqueues a callback once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from jobqd import payload
from jobqd.store import jobs
from jobqd.store.sql import queries


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


def enqueue(
    conn: psycopg.Connection,
    schema: str,
    items: Sequence[tuple[str, Any] | Mapping[str, Any]],
    *,
    queue: str = "default",
    name: str | None = None,
    callback: str | None = None,
    callback_args: Any = None,
    callback_queue: str | None = None,
    max_payload_bytes: int = payload.DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[int, list[int]]:
    """Enqueue `items` as one bundle, in one transaction; returns (bundle id, job ids)."""
    with conn.transaction():
        params = {
            "total": len(items),
            "name": name,
            "callback_task": callback,
            "callback_queue": callback_queue or queue,
            "callback_args": payload.encode(callback_args),
        }
        bundle_id = conn.execute(queries(schema).bundles_create, params).fetchone()[0]
        ids = []
        for item in items:
            task, kwargs = jobs.split(item)
            kwargs.setdefault("queue", queue)
            ids.append(
                jobs.enqueue(
                    conn,
                    schema,
                    task,
                    bundle_id=bundle_id,
                    max_payload_bytes=max_payload_bytes,
                    **kwargs,
                )
            )
    return bundle_id, ids


def get(conn: psycopg.Connection, schema: str, bundle_id: int) -> BundleInfo | None:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(queries(schema).bundles_get, {"id": bundle_id}).fetchone()
    return BundleInfo(**row) if row else None

"""Bundles: groups of jobs whose last end enqueues a callback once.

The rules live in the SQL API (migrations/0004_edges.sql): a bundle's jobs are enqueued in
the transaction that creates it and exactly `total` of them must join by its commit; an empty
bundle finishes at once; a job deduplicated onto another job cannot join; a job cancelled or
deleted before it ended counts as cancelled.
"""

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

    @property
    def ended(self) -> int:
        """Jobs of the bundle that have ended, whichever way."""
        return self.succeeded + self.dead + self.cancelled


def enqueue(
    conn: psycopg.Connection,
    schema: str,
    items: Sequence[tuple[str, Any] | Mapping[str, Any]],
    *,
    queue: str | None = None,
    name: str | None = None,
    callback: str | None = None,
    callback_args: Any = None,
    callback_queue: str | None = None,
    max_payload_bytes: int = payload.DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[int, list[int]]:
    """Enqueue `items` as one bundle, in one transaction; returns (bundle id, job ids).
    Without `queue`, each job goes to its task's queue; without `callback_queue`, the
    callback goes to `queue`, else to the callback task's."""
    params = {
        "total": len(items),
        "name": name,
        "callback_task": callback,
        "callback_queue": callback_queue or queue or (callback and jobs.route(callback, None)),
        "callback_args": payload.encode(callback_args),
    }
    with conn.transaction(), jobs.clean_errors():
        bundle_id = conn.execute(queries(schema).bundles_create, params).fetchone()[0]
        ids = jobs.enqueue_many(
            conn,
            schema,
            items,
            queue=queue,
            bundle_id=bundle_id,
            max_payload_bytes=max_payload_bytes,
        )
    return bundle_id, ids


def get(conn: psycopg.Connection, schema: str, bundle_id: int) -> BundleInfo | None:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(queries(schema).bundles_get, {"id": bundle_id}).fetchone()
    return BundleInfo(**row) if row else None


def newest(
    conn: psycopg.Connection, schema: str, *, unfinished: bool = False, limit: int = 100
) -> list[BundleInfo]:
    """Bundles newest first; only those still waiting for jobs when `unfinished`."""
    cur = conn.cursor(row_factory=dict_row)
    params = {"unfinished": unfinished, "limit": limit}
    return [BundleInfo(**row) for row in cur.execute(queries(schema).bundles_list, params)]


def members(conn: psycopg.Connection, schema: str, bundle_id: int) -> dict[str, int]:
    """How many of the bundle's jobs are in each state now."""
    rows = conn.execute(queries(schema).bundles_members, {"id": bundle_id}).fetchall()
    return {state: count for state, count in rows}

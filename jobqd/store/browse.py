"""What the dashboard reads besides `jobqctl status`: the jobs list in keyset pages, the last
hour minute by minute, pickup latency, and the queues table as it is.

The jobs list must answer quickly at millions of rows whatever the filters. Dead and cancelled
jobs have an index of their own (jobs_ended_browse), so a page of them is one index range.
Any other filter is answered slice by slice: each statement reads one range of ids of the
primary key, newest first, until the page is full, the ids run out, or `budget` seconds have
passed; then the page says how far down it searched, and the next request carries on from
there. Slices start small and grow with the rate the last one was read at, so that one slice
fits the budget left whatever the filter costs per row (a text search reads every row's args).
A filter that matches few jobs thus costs a bounded time per page instead of a walk of the
whole table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from jobqd.store.sql import queries

SLICE = 200_000
"""Ids of the primary key one statement of the jobs list reads at most."""
FIRST_SLICE = 2_000
"""Ids the first statement of a page reads; later ones grow with the rate measured."""
BUDGET = 0.1
"""Seconds a jobs-list page goes on searching slices before it answers with what it found."""
INDEXED_STATES = ("dead", "cancelled")
"""States whose jobs the list reads from jobs_ended_browse, without slicing."""
MINUTES = 60


@dataclass(frozen=True, slots=True)
class Filters:
    """The jobs list's filters; None means any."""

    queue: str | None = None
    state: str | None = None
    task: str | None = None
    text: str | None = None
    bundle: int | None = None

    def params(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "state": self.state,
            "task": self.task,
            "text": self.text,
            "bundle": self.bundle,
        }


@dataclass(slots=True)
class Page:
    """One page of the jobs list, newest first.

    `next_before` continues after the last row (None: there is nothing older); when the
    search stopped early, `searched_to` is the lowest id it looked at and `next_before`
    continues from there."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    next_before: int | None = None
    searched_to: int | None = None
    statements: int = 0


def jobs(
    conn: psycopg.Connection,
    schema: str,
    filters: Filters,
    *,
    before: int | None = None,
    limit: int = 50,
    budget: float = BUDGET,
    slice_ids: int = SLICE,
) -> Page:
    """A page of jobs matching `filters` with ids below `before` (None: the newest)."""
    sql = queries(schema)
    low, high = conn.execute(sql.browse_id_range).fetchone()
    page = Page()
    if high is None:
        return page
    top = high + 1 if before is None else min(before, high + 1)
    # Dead and cancelled jobs, or one bundle's, come from their own index: no slicing.
    exact = (filters.state in INDEXED_STATES or filters.bundle is not None) and not (
        filters.text or filters.task
    )
    deadline = time.monotonic() + budget
    size = min(FIRST_SLICE, slice_ids)
    cur = conn.cursor(row_factory=dict_row)
    while top > low:
        floor = low if exact else max(low, top - size)
        params = {**filters.params(), "before": top, "floor": floor}
        params["limit"] = limit + 1 - len(page.rows)
        began = time.monotonic()
        # Not prepared: the filters decide the plan, and a generic plan would fit none.
        found = cur.execute(sql.browse_jobs, params, prepare=False).fetchall()
        took = time.monotonic() - began
        page.statements += 1
        page.rows.extend(found)
        if len(page.rows) > limit:
            del page.rows[limit:]
            page.next_before = page.rows[-1]["id"]
            return page
        read, top = top - floor, floor
        left = deadline - time.monotonic()
        if top > low and left <= 0:
            page.next_before = page.searched_to = top
            return page
        fits = read / max(took, 1e-4) * left  # ids the time left can read at this rate
        size = int(max(min(FIRST_SLICE, slice_ids), min(slice_ids, 4 * size, fits)))
    return page


def last_hour(conn: psycopg.Connection, schema: str) -> dict[str, list[tuple[int, int]]]:
    """{queue: [(succeeded, dead)] for each of the last 60 minutes, oldest first}."""
    series: dict[str, list[tuple[int, int]]] = {}
    for queue, minutes_ago, succeeded, dead in conn.execute(queries(schema).browse_last_hour):
        minutes = series.setdefault(queue, [(0, 0)] * MINUTES)
        index = MINUTES - 1 - min(max(minutes_ago, 0), MINUTES - 1)
        minutes[index] = (succeeded, dead)
    return series


def pickup(conn: psycopg.Connection, schema: str) -> dict[str, dict[str, float]]:
    """{queue: {jobs, p50, p95}}: seconds from due to claimed, over the last hour's jobs."""
    rows = conn.execute(queries(schema).browse_pickup).fetchall()
    return {queue: {"jobs": jobs, "p50": p50, "p95": p95} for queue, jobs, p50, p95 in rows}


def queue_rows(conn: psycopg.Connection, schema: str) -> dict[str, dict[str, Any]]:
    """Every row of jobqd.queues, by name, with whatever columns the schema has; times
    (columns named *_at or *_until) as datetimes."""
    rows = {}
    for name, row in conn.execute(queries(schema).browse_queues):
        for key, value in row.items():
            if isinstance(value, str) and key.endswith(("_at", "_until")):
                row[key] = datetime.fromisoformat(value)
        rows[name] = row
    return rows

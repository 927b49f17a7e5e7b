"""The dashboard's state changes, each through the function jobqctl calls for the same thing.

Every action returns the line the viewer sees next (a `Notice`) and logs what it did with who
asked; ValueError carries a message for the viewer when the request itself is wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from jobqd.config.durations import format_duration, parse_duration
from jobqd.config.settings import Settings
from jobqd.store import admin, queues
from jobqd.store import jobs as job_rows

log = logging.getLogger("jobqd.http.dashboard")

MAX_BULK_IDS = 500


@dataclass(frozen=True, slots=True)
class Notice:
    text: str
    ok: bool = True


def _fields(info: job_rows.JobInfo) -> dict[str, Any]:
    return {"job_id": info.id, "queue": info.queue, "task": info.task, "attempt": info.attempt}


def job_action(conn: psycopg.Connection, schema: str, verb: str, job_id: int, by: str) -> Notice:
    """retry, cancel or delete one job."""
    info = job_rows.get(conn, schema, job_id)
    if info is None:
        return Notice(f"no job {job_id} (it may have been pruned)", ok=False)
    if verb == "retry":
        done = bool(admin.retry(conn, schema, [job_id]))
        allowed, past = "dead, cancelled or waiting", "put back in line"
    elif verb == "cancel":
        done = bool(admin.cancel(conn, schema, [job_id]))
        allowed, past = "queued or running", "cancelled"
    elif verb == "delete":
        done = bool(job_rows.delete(conn, schema, [job_id]))
        allowed, past = "not running (cancel it first)", "deleted"
    else:
        raise ValueError(f"unknown action {verb!r}")
    if not done:
        return Notice(f"job {job_id} is {info.state}: only {allowed} jobs can be {past}", ok=False)
    log.info("dashboard: job %s %s by %s", job_id, past, by, extra=_fields(info))
    return Notice(f"job {job_id} {past}")


def retry_ids(conn: psycopg.Connection, schema: str, ids: list[int], by: str) -> Notice:
    """Retry the jobs picked on a page of the list."""
    if not ids:
        return Notice("no jobs picked: tick the jobs to retry first", ok=False)
    if len(ids) > MAX_BULK_IDS:
        raise ValueError(f"at most {MAX_BULK_IDS} jobs at once")
    done = admin.retry(conn, schema, ids)
    log.info("dashboard: %d of %d picked jobs retried by %s", len(done), len(ids), by)
    skipped = len(ids) - len(done)
    tail = f"; {skipped} were not dead, cancelled or waiting" if skipped else ""
    return Notice(f"retried {len(done)} of {len(ids)} jobs{tail}", ok=bool(done))


def retry_all(conn: psycopg.Connection, schema: str, queue: str, state: str, by: str) -> Notice:
    """Retry every job of a queue in a state (jobqctl retry --queue Q --state S)."""
    count = admin.retry_queue(conn, schema, queue, state)  # ValueError for a wrong state
    log.info("dashboard: %d %s jobs of %s retried by %s", count, state, queue, by)
    if not count:
        return Notice(f"no {state} jobs in queue {queue!r}: nothing to retry", ok=False)
    return Notice(f"retried {count} {state} jobs of queue {queue!r}")


def pause(
    conn: psycopg.Connection, schema: str, queue: str, duration: str | None, by: str
) -> Notice:
    """Pause a queue on every node; for `duration` (like 10m) when given."""
    if not queues.known(conn, schema, queue):
        return Notice(f"no queue {queue!r}: no daemon serves it and it has no jobs", ok=False)
    seconds = None
    if duration:
        seconds = parse_duration(duration)  # ValueError names the format
        if seconds <= 0:
            raise ValueError("a pause lasts longer than 0s; leave it empty to pause until resumed")
    queues.pause(conn, schema, queue, duration=seconds, paused_by=f"dashboard ({by})")
    for_ = f" for {format_duration(seconds)}" if seconds else ""
    log.info("dashboard: queue %s paused%s by %s", queue, for_, by, extra={"queue": queue})
    return Notice(f"queue {queue!r} paused{for_}: every node stops claiming from it")


def resume(conn: psycopg.Connection, schema: str, queue: str, by: str) -> Notice:
    queues.resume(conn, schema, queue)
    log.info("dashboard: queue %s resumed by %s", queue, by, extra={"queue": queue})
    return Notice(f"queue {queue!r} resumed: workers claim from it again")


def run_cron(conn: psycopg.Connection, settings: Settings | None, name: str, by: str) -> Notice:
    """Enqueue a cron entry's job now (jobqctl cron run NAME)."""
    from jobqd.maintenance import cron

    if settings is None:
        return Notice("cron entries live in the config file, which this dashboard lacks", ok=False)
    try:
        job_id = cron.fire_now(conn, settings, name)
    except LookupError as exc:
        return Notice(str(exc), ok=False)
    log.info("dashboard: cron %s run by %s", name, by, extra={"job_id": job_id})
    return Notice(f"cron entry {name!r} enqueued as job {job_id}")

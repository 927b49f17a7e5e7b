"""Shared test support: tasks that leave evidence in the database, worker processes, waits."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from jobqd.tasks import Discard, Job, Retry, Snooze, task

LEDGER_DSN_ENV = "JOBQD_TEST_LEDGER_DSN"
LEDGER_TABLE = """CREATE TABLE IF NOT EXISTS public.ledger (
    job_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL, task text,
    at timestamptz NOT NULL DEFAULT clock_timestamp())"""

_local = threading.local()


def _ledger_conn() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ[LEDGER_DSN_ENV], autocommit=True)
        _local.conn = conn
    return conn


def record(job: Job) -> None:
    _ledger_conn().execute(
        "INSERT INTO public.ledger (job_id, attempt, pid, task) VALUES (%s, %s, %s, %s)",
        (job.id, job.attempt, os.getpid(), job.task),
    )


@task("test.record")
def record_task(job: Job) -> None:
    record(job)


@task("test.noop")
def noop(job: Job) -> None:
    return None


@task("test.result")
def result_task(job: Job) -> dict[str, Any]:
    return {"doubled": job.args["n"] * 2}


@task("test.fail", max_attempts=3, backoff=lambda attempt: 0.05)
def always_fail(job: Job) -> None:
    record(job)
    raise ValueError(f"boom on attempt {job.attempt}")


@task("test.sleep")
def sleep_task(job: Job) -> None:
    """Sleeps args.seconds; records when it started and, if it got to the end, finished."""
    record(job)
    deadline = time.monotonic() + job.args.get("seconds", 1)
    while time.monotonic() < deadline:
        if job.args.get("cooperative") and job.cancelled:
            job.check()
        time.sleep(0.01)
    _ledger_conn().execute(
        "INSERT INTO public.ledger (job_id, attempt, pid, task) VALUES (%s, %s, %s, 'finished')",
        (job.id, job.attempt, os.getpid()),
    )


_HELD: list[bytes] = []


@task("test.grow")
def grow(job: Job) -> None:
    """Keeps args.mib MiB, written so the pages count in RSS, for the rest of the process's
    life: a leaky task."""
    record(job)
    _HELD.append(b"\x01" * (job.args["mib"] << 20))


@task("test.snooze_once")
def snooze_once(job: Job) -> str:
    record(job)
    if (
        not _ledger_conn()
        .execute(
            "SELECT count(*) FROM public.ledger WHERE job_id = %s AND task = 'snoozed'", (job.id,)
        )
        .fetchone()[0]
    ):
        _ledger_conn().execute(
            "INSERT INTO public.ledger (job_id, attempt, pid, task) VALUES (%s, %s, %s, 'snoozed')",
            (job.id, job.attempt, os.getpid()),
        )
        raise Snooze(0.05)
    return "ok"


@task("test.discard")
def discard(job: Job) -> None:
    raise Discard("not worth it")


@task("test.retry_after")
def retry_after(job: Job) -> None:
    record(job)
    if job.attempt < 2:
        raise Retry(after=0.05, reason="come back later")


@task("test.async")
async def async_task(job: Job) -> dict[str, int]:
    import asyncio

    await asyncio.sleep(0.01)
    record(job)
    return {"n": job.args["n"]}


def run_worker(
    config: Any, env: dict[str, str] | None = None, imports: tuple[str, ...] = ("helpers",)
) -> None:
    """Target of a spawned worker process: the same serve() the daemon's children run."""
    os.environ.update(env or {})
    from jobqd.observe.logs import setup_logging
    from jobqd.worker.process import serve

    setup_logging("json", "info", role="worker")
    raise SystemExit(serve(config, imports=imports))


def spawn_worker(
    config: Any, dsn: str, imports: tuple[str, ...] = ("helpers",)
) -> multiprocessing.Process:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=run_worker, args=(config, {LEDGER_DSN_ENV: dsn}, imports), daemon=True
    )
    proc.start()
    return proc


def worker_config(dsn: str, **settings: Any) -> Any:
    """A worker's config as an empty config file makes it (queue `default`), with `settings`
    (WorkerConfig fields) replacing what they name."""
    from jobqd.config.settings import Settings
    from jobqd.worker.process import WorkerConfig

    config = WorkerConfig.from_settings(dsn, Settings.default(), "default")
    if "lease" in settings and "heartbeat" not in settings:
        settings["heartbeat"] = None  # lease / 3, as the config resolves it for a given lease
    return dataclasses.replace(config, **settings)


def start_worker(
    procs: list[Any], dsn: str, *, imports: tuple[str, ...] = ("helpers",), **settings: Any
) -> multiprocessing.Process:
    """Spawn a worker (queue `default` unless `settings` say otherwise) that imports
    `imports`, and add it to `procs`, which the calling test's fixture tears down."""
    proc = spawn_worker(worker_config(dsn, **settings), dsn, imports)
    procs.append(proc)
    return proc


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def scalar(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def answers(dsn: str) -> bool:
    """Whether a PostgreSQL server takes connections at `dsn` (within 3 s)."""
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False

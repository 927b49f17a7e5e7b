"""The reaper against a real Postgres: taking back the jobs of dead processes at once
(`release`, which the master's take-back also uses), the duty's counts and cadence, and a
killed worker's jobs running again after their leases expire.
"""

from __future__ import annotations

import os
import signal

import psycopg
from helpers import scalar, start_worker, wait_for
from leaders import start

from jobqd import Client
from jobqd.config.settings import parse
from jobqd.maintenance.reaper import Reaper, release
from jobqd.store.sql import queries


def process(conn, silent_for: str = "0 seconds") -> int:
    return conn.execute(
        "INSERT INTO jobqd.processes (host, pid, role, queue, heartbeat_at)"
        " VALUES ('elsewhere', 4242, 'worker', 'default', now() - %s::interval) RETURNING id",
        (silent_for,),
    ).fetchone()[0]


def running_job(conn, locked_by: int, attempt: int = 1, max_attempts: int = 5) -> int:
    return conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, state, attempt, max_attempts, lease_token,"
        " locked_by, lease_expires_at) VALUES ('default', 't', 'running', %s, %s,"
        " nextval('jobqd.lease_tokens'), %s, now() + interval '1 hour') RETURNING id",
        (attempt, max_attempts, locked_by),
    ).fetchone()[0]


def state(conn, job_id: int) -> str:
    return conn.execute("SELECT state FROM jobqd.jobs WHERE id = %s", (job_id,)).fetchone()[0]


def test_release_takes_back_only_the_dead_processes_jobs_before_their_leases_end(conn):
    dead, alive = process(conn), process(conn)
    retried = running_job(conn, dead)
    exhausted = running_job(conn, dead, attempt=3, max_attempts=3)
    other = running_job(conn, alive)

    taken = sorted(release(conn, queries(), [(dead, "killed by SIGKILL (out of memory?)")]))

    assert [(job.job_id, job.state) for job in taken] == [(retried, "queued"), (exhausted, "dead")]
    assert [job.outcome for job in taken] == [
        "queued again",
        "dead (no attempts left or at-most-once)",
    ]
    assert taken[0].fields == {"job_id": retried, "queue": "default", "task": "t", "attempt": 1}
    assert (state(conn, retried), state(conn, exhausted), state(conn, other)) == (
        "queued",
        "dead",
        "running",
    )
    error = "worker process exited: killed by SIGKILL (out of memory?)"
    for job_id in (retried, exhausted):
        row = conn.execute(
            "SELECT last_error, errors->-1->>'kind' FROM jobqd.jobs WHERE id = %s", (job_id,)
        ).fetchone()
        assert row[0].startswith(f"{error} (process {dead},") and row[1] == "WorkerExited"
    assert release(conn, queries(), [(dead, None)]) == []


def test_the_reaper_duty_counts_what_it_took_back_and_is_due_every_interval(conn):
    config = parse(
        "reaper: {interval: 300ms, process_grace: 3s}",
        "<test>",
        {"JOBQD_DATABASE_URL": "postgresql:///unused"},
    )
    silent = process(conn, silent_for="1 minute")
    job = running_job(conn, silent)
    duty = Reaper(config)
    duty.start(100.0)
    assert duty.due(100.0)

    result = duty.run_due(conn, 100.0)

    assert dict(result.counts) == {"queued": 1, "dead": 0, "processes": 1, "unhandled_dead": 0}
    assert result.again_in == 0.3 and duty.next_due == 100.3
    assert not duty.due(100.2)
    assert state(conn, job) == "queued"
    assert conn.execute("SELECT count(*) FROM jobqd.processes").fetchone()[0] == 0
    assert not duty.run(conn)


def test_reaper_requeues_a_killed_workers_jobs_after_lease_expiry(db, procs):
    with Client(db) as client:
        ids = [client.enqueue("test.sleep", {"seconds": 2}) for _ in range(2)]
    worker = start_worker(procs, db, concurrency=2, lease=2.0)
    wait_for(
        lambda: scalar(db, "SELECT count(*) FROM public.ledger WHERE attempt = 1") == 2,
        what="both jobs started",
    )
    os.kill(worker.pid, signal.SIGKILL)
    start(procs, db)
    start_worker(procs, db, concurrency=2, lease=2.0)
    with Client(db) as client:
        wait_for(
            lambda: all(client.get(i).state == "succeeded" for i in ids),
            timeout=20,
            what="both jobs ran again and succeeded",
        )
        for job_id in ids:
            info = client.get(job_id)
            assert info.attempt == 2
            assert info.errors[0]["kind"] == "LeaseExpired"
            assert f"pid {worker.pid}" in info.errors[0]["message"]
    with psycopg.connect(db) as c:
        attempts = c.execute(
            "SELECT job_id, array_agg(attempt ORDER BY attempt) FROM public.ledger"
            " WHERE task = 'test.sleep' GROUP BY job_id ORDER BY job_id"
        ).fetchall()
    assert attempts == [(i, [1, 2]) for i in sorted(ids)]

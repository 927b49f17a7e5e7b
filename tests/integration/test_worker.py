"""Worker processes against a real Postgres: claiming, leases, outcomes, timeouts, recycling.

Workers run in spawned processes through the same serve() the daemon's children run; jobs
leave evidence in a ledger table, so every assertion is about rows, not about code paths.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

import psycopg
import pytest
from helpers import LEDGER_TABLE, scalar, start_worker, wait_for

from jobqd import Client
from jobqd.errors import EXIT_RECYCLE
from jobqd.store.sql import queries


@pytest.fixture
def db(dsn, conn):
    conn.execute(LEDGER_TABLE)
    return dsn


def states(dsn):
    with psycopg.connect(dsn) as c:
        return dict(c.execute("SELECT state, count(*) FROM jobqd.jobs GROUP BY state").fetchall())


def reap(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            queries("jobqd").leases_release_expired, {"batch": 1000, "reason": None}
        ).fetchall()


def test_workers_drain_ten_thousand_jobs_exactly_once(db, workers):
    with Client(db) as client:
        client.enqueue_many(("test.record", {"i": i}) for i in range(10_000))
    for _ in range(3):
        start_worker(workers, db, concurrency=8, lease=10)
    wait_for(lambda: states(db) == {"succeeded": 10_000}, timeout=90, what="all 10,000 succeeded")
    with psycopg.connect(db) as c:
        total, distinct, pids, attempts = c.execute(
            "SELECT count(*), count(DISTINCT job_id), count(DISTINCT pid), max(attempt)"
            " FROM public.ledger"
        ).fetchone()
    assert (total, distinct, attempts) == (10_000, 10_000, 1)
    assert pids == 3


def test_failing_job_retries_with_backoff_then_dies_with_its_errors(db, workers):
    with Client(db) as client:
        job = client.enqueue("test.fail")
        start_worker(workers, db)
        wait_for(lambda: client.get(job).state == "dead", what="job dead")
        info = client.get(job)
    assert info.attempt == 3
    assert [e["message"] for e in info.errors] == [
        f"ValueError: boom on attempt {n}" for n in (1, 2, 3)
    ]
    assert "Traceback" in info.errors[-1]["traceback"]
    assert info.last_error == "ValueError: boom on attempt 3"
    with psycopg.connect(db) as c:
        times = [r[0] for r in c.execute("SELECT at FROM public.ledger ORDER BY at")]
    assert len(times) == 3
    assert all((b - a).total_seconds() >= 0.04 for a, b in itertools.pairwise(times))


def test_error_history_is_capped(db, conn, workers):
    conn.execute("UPDATE jobqd.settings SET error_history = 2")
    with Client(db) as client:
        job = client.enqueue("test.fail", max_attempts=4)
        start_worker(workers, db)
        wait_for(lambda: client.get(job).state == "dead", what="job dead")
        assert [e["attempt"] for e in client.get(job).errors] == [3, 4]


def test_outcome_kinds(db, workers):
    with Client(db) as client:
        ok = client.enqueue("test.result", {"n": 21})
        snoozed = client.enqueue("test.snooze_once")
        discarded = client.enqueue("test.discard", max_attempts=5)
        retried = client.enqueue("test.retry_after")
        unknown = client.enqueue("no.such.task", max_attempts=2)
        coroutine = client.enqueue("test.async", {"n": 5})
        start_worker(workers, db)
        ended = ("succeeded", "dead")
        ids = (ok, snoozed, discarded, retried, coroutine)
        wait_for(lambda: all(client.get(j).state in ended for j in ids), what="all jobs ended")
        assert client.get(ok).result == {"doubled": 42}
        info = client.get(snoozed)
        assert (info.state, info.attempt, info.result) == ("succeeded", 1, "ok")
        info = client.get(discarded)
        assert (info.state, info.attempt, info.last_error) == ("dead", 1, "not worth it")
        info = client.get(retried)
        assert (info.state, info.attempt, info.errors[0]["message"]) == (
            "succeeded",
            2,
            "come back later",
        )

        # Released for a worker that knows the task, without spending an attempt.
        def released():
            info = client.get(unknown)
            return info.state == "queued" and info.last_error and info

        info = wait_for(released, what="the unknown task's job released")
        assert info.attempt == 0
        assert "unknown task 'no.such.task'" in info.last_error
        assert client.get(coroutine).result == {"n": 5}
    assert workers[0].is_alive()


def test_paused_queue_is_not_claimed_until_resumed(db, workers):
    with Client(db) as client:
        client.pause("default")
        job = client.enqueue("test.record")
        start_worker(workers, db, poll_interval=0.2)
        wait_for(lambda: scalar(db, "SELECT count(*) FROM jobqd.processes") == 1, what="registered")
        time.sleep(0.6)
        assert client.get(job).state == "queued"
        client.resume("default")
        wait_for(lambda: client.get(job).state == "succeeded", timeout=5, what="resumed")


def test_priority_then_run_at_order(db, workers):
    with Client(db) as client:
        low = client.enqueue_many([("test.record", {})] * 3, priority=5)
        high = client.enqueue_many([("test.record", {})] * 3, priority=-5)
        start_worker(workers, db, concurrency=1)
        wait_for(lambda: states(db) == {"succeeded": 6}, what="all ran")
    with psycopg.connect(db) as c:
        order = [r[0] for r in c.execute("SELECT job_id FROM public.ledger ORDER BY at")]
    assert order == high + low


def test_sigkilled_worker_jobs_run_again_after_lease_expiry(db, workers):
    with Client(db) as client:
        ids = client.enqueue_many([("test.sleep", {"seconds": 30})] * 3)
        victim = start_worker(workers, db, concurrency=3, lease=2)
        wait_for(lambda: states(db) == {"running": 3}, what="claimed")
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(5)
        assert reap(db) == []  # leases still valid: nothing to release yet
        wait_for(lambda: reap(db), timeout=5, what="leases expired and reaped")
        assert states(db) == {"queued": 3}
        info = client.get(ids[0])
        assert "lease expired" in info.last_error and info.attempt == 1
        with psycopg.connect(db, autocommit=True) as c:
            c.execute("UPDATE jobqd.jobs SET run_at = now(), args = '{\"seconds\": 0.1}'")
        start_worker(workers, db, concurrency=3, lease=2)
        wait_for(lambda: states(db) == {"succeeded": 3}, what="rerun")
        assert {client.get(j).attempt for j in ids} == {2}


def test_frozen_worker_cannot_write_a_stale_outcome(db, workers):
    """SIGSTOP a worker past its lease; another worker takes the job; the old one resumes,
    finishes first, and must not be able to write its outcome over the new attempt."""
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 2.5})
        frozen = start_worker(workers, db, lease=1.5, heartbeat=0.5)
        wait_for(lambda: client.get(job).state == "running", what="claimed by first worker")
        time.sleep(0.5)
        os.kill(frozen.pid, signal.SIGSTOP)
        wait_for(lambda: reap(db), timeout=5, what="lease expired and reaped")
        with psycopg.connect(db, autocommit=True) as c:
            c.execute("UPDATE jobqd.jobs SET run_at = now()")
        second = start_worker(workers, db, lease=10)
        wait_for(lambda: client.get(job).attempt == 2, what="second attempt claimed")
        os.kill(frozen.pid, signal.SIGCONT)
        wait_for(
            lambda: scalar(
                db,
                "SELECT count(*) FROM public.ledger WHERE task = 'finished' AND pid = %s",
                (frozen.pid,),
            ),
            what="the frozen worker's task finished",
        )
        assert client.get(job).state == "running"  # its success was not written
        wait_for(lambda: client.get(job).state == "succeeded", what="second attempt done")
        info = client.get(job)
        assert info.attempt == 2
    with psycopg.connect(db) as c:
        finishers = c.execute(
            "SELECT pid, attempt FROM public.ledger WHERE task = 'finished' ORDER BY at"
        ).fetchall()
    assert finishers == [(frozen.pid, 1), (second.pid, 2)]


def test_cancelled_running_job_is_flagged_and_not_overwritten(db, workers):
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 20, "cooperative": True})
        start_worker(workers, db, lease=1.5, heartbeat=0.3)
        wait_for(lambda: client.get(job).state == "running", what="claimed")
        assert client.cancel(job)
        wait_for(
            lambda: scalar(
                db, "SELECT count(*) FROM jobqd.processes WHERE (metadata->>'busy')::int = 0"
            ),
            what="the task noticed and stopped",
        )
        assert client.get(job).state == "cancelled"


def test_hard_timeout_fails_the_job_and_recycles_the_process(db, workers):
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 30}, max_attempts=1)
        other = client.enqueue("test.record")
        proc = start_worker(workers, db, timeout=0.5, grace=0.5, concurrency=2)
        wait_for(lambda: client.get(job).state == "dead", what="timed out")
        proc.join(10)
        assert proc.exitcode == EXIT_RECYCLE
        info = client.get(job)
        assert info.errors[-1]["kind"] == "Timeout" and "timeout" in info.last_error
        assert client.get(other).state == "succeeded"


def test_soft_timeout_sets_the_cancelled_flag(db, workers):
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 30, "cooperative": True}, max_attempts=1)
        start_worker(workers, db, timeout=0.3, grace=20)
        wait_for(lambda: client.get(job).state == "dead", what="stopped cooperatively")
        assert "soft timeout" in client.get(job).last_error


def test_max_jobs_per_process_recycles_after_running_jobs(db, workers):
    with Client(db) as client:
        client.enqueue_many([("test.record", {})] * 10)
        proc = start_worker(workers, db, max_jobs_per_process=4, concurrency=2)
        proc.join(20)
        assert proc.exitcode == EXIT_RECYCLE
        assert states(db) == {"succeeded": 4, "queued": 6}


def test_max_memory_recycles_after_running_jobs_finish(db, workers):
    with Client(db) as client:
        sleeper = client.enqueue("test.sleep", {"seconds": 1})
        proc = start_worker(workers, db, max_memory=200 << 20, concurrency=2)
        wait_for(lambda: client.get(sleeper).state == "running", what="the sleeper running")
        leak = client.enqueue("test.grow", {"mib": 300})
        proc.join(20)
        assert proc.exitcode == EXIT_RECYCLE
        # The sleeper was running when RSS went over: it finished rather than being released.
        assert (client.get(leak).state, client.get(sleeper).state) == ("succeeded", "succeeded")
        assert client.get(sleeper).attempt == 1


def test_sigterm_drains_running_jobs_and_deregisters(db, workers):
    with Client(db) as client:
        ids = client.enqueue_many([("test.sleep", {"seconds": 1})] * 4)
        proc = start_worker(workers, db, concurrency=4)
        wait_for(lambda: states(db) == {"running": 4}, what="running")
        assert scalar(db, "SELECT count(*) FROM jobqd.processes") == 1
        os.kill(proc.pid, signal.SIGTERM)
        client.enqueue("test.record")  # must not be claimed while draining
        proc.join(10)
        assert proc.exitcode == 0
        assert [client.get(j).state for j in ids] == ["succeeded"] * 4
        assert states(db) == {"succeeded": 4, "queued": 1}
        assert scalar(db, "SELECT count(*) FROM jobqd.processes") == 0


def test_sigquit_releases_running_jobs_at_once(db, workers):
    with Client(db) as client:
        ids = client.enqueue_many([("test.sleep", {"seconds": 30})] * 2)
        proc = start_worker(workers, db, concurrency=2)
        wait_for(lambda: states(db) == {"running": 2}, what="running")
        os.kill(proc.pid, signal.SIGQUIT)
        proc.join(5)
        assert proc.exitcode == 0
        infos = [client.get(j) for j in ids]
        assert [(i.state, i.attempt) for i in infos] == [("queued", 0), ("queued", 0)]


def test_drain_deadline_releases_what_is_still_running(db, workers):
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 30})
        proc = start_worker(workers, db, shutdown_timeout=0.5)
        wait_for(lambda: client.get(job).state == "running", what="running")
        began = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(5)
        assert time.monotonic() - began < 3
        assert client.get(job).state == "queued"


def test_at_most_once_job_interrupted_is_dead_not_rerun(db, workers):
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 30})
        proc = start_worker(workers, db, delivery="at_most_once")
        wait_for(lambda: client.get(job).state == "running", what="running")
        os.kill(proc.pid, signal.SIGQUIT)
        proc.join(5)
        info = client.get(job)
        assert info.state == "dead" and "at-most-once" in info.last_error


def test_at_most_once_lease_expiry_is_dead(db, workers):
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 30})
        victim = start_worker(workers, db, lease=1, delivery="at_most_once")
        wait_for(lambda: client.get(job).state == "running", what="running")
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: reap(db), timeout=5, what="reaped")
        info = client.get(job)
        assert info.state == "dead" and "lease expired" in info.last_error


@pytest.mark.parametrize(
    ("delivery", "expected"), [("at_least_once", "queued"), ("at_most_once", "dead")]
)
def test_a_replacement_takes_back_a_dead_predecessors_jobs(db, workers, delivery, expected):
    """What the master does after reaping a worker child: the next worker of the queue gets
    the dead one's process id and gives its jobs back at once, by the reaper's rules."""
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 30})
        victim = start_worker(workers, db, lease=600, delivery=delivery)
        wait_for(lambda: client.get(job).state == "running", what="running")
        dead_id = scalar(db, "SELECT id FROM jobqd.processes")
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(5)
        assert reap(db) == []  # a 10-minute lease: the reaper alone would wait

        # Its first retry is due in 1 s; a long poll keeps the replacement from rerunning it.
        how = "killed by SIGKILL (out of memory?)"
        start_worker(
            workers, db, delivery=delivery, dead_workers=((dead_id, how),), poll_interval=30
        )
        wait_for(lambda: client.get(job).state == expected, timeout=10, what=expected)
        info = client.get(job)
        assert info.last_error.startswith(f"worker process exited: {how} (process {dead_id},")
        assert scalar(db, "SELECT count(*) FROM jobqd.processes WHERE id = %s", (dead_id,)) == 0


def test_listen_notify_wakes_an_idle_worker_quickly(db, workers):
    with Client(db) as client:
        start_worker(workers, db, poll_interval=30)
        wait_for(lambda: scalar(db, "SELECT count(*) FROM jobqd.processes") == 1, what="registered")
        time.sleep(0.3)
        job = client.enqueue("test.record")
        wait_for(lambda: client.get(job).state == "succeeded", timeout=2, what="woken by NOTIFY")


def test_worker_survives_connections_cut_by_the_server(db, workers):
    with Client(db) as client:
        start_worker(workers, db, poll_interval=0.2)
        worker_sessions = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'jobqd worker%%'"
        )
        wait_for(lambda: scalar(db, worker_sessions) == 2, what="both worker sessions open")
        killed = scalar(
            db,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name LIKE 'jobqd worker%%'",
        )
        assert killed == 2
        job = client.enqueue("test.record")
        wait_for(lambda: client.get(job).state == "succeeded", timeout=10, what="reconnected")


def test_command_task(db, tmp_path, workers):
    from jobqd.tasks import TaskSpec, command_task

    class Settings:
        command = ("sh", "-c", "echo hello {name}; echo oops >&2; exit {code}")
        env = {}
        cwd = str(tmp_path)
        timeout = 5
        queue = "default"
        max_attempts = 1

    spec: TaskSpec = command_task("shell", Settings, grace=1.0)
    from jobqd.tasks import Job

    ok = spec.fn(
        Job(
            id=1,
            queue="q",
            task="shell",
            args={"name": "ops", "code": 0},
            attempt=1,
            max_attempts=1,
        )
    )
    assert ok["stdout"] == "hello ops\n" and ok["stderr"] == "oops\n"
    with pytest.raises(Exception, match="exited with status 3"):
        spec.fn(
            Job(
                id=1,
                queue="q",
                task="shell",
                args={"name": "x", "code": 3},
                attempt=1,
                max_attempts=1,
            )
        )

"""Issue 11 items 1 and 5 against a real Postgres: one policy resolver (job, else task or
longest `prefix.*` route, else queue) for the reaper, the release of a dead worker's jobs, a
worker's release at shutdown and jobqctl; and jobs whose task no worker knows, which are
released without spending an attempt, shown as unhandled, and end dead only after
`unknown_task_window`."""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta

import pytest
from helpers import scalar, start_worker, wait_for
from leaders import FAST, start
from psycopg.rows import dict_row
from test_ctl import as_json, jobqctl

from jobqd import Client
from jobqd.config.settings import ConfigError, parse
from jobqd.maintenance.reaper import release, run_once
from jobqd.store.sql import queries

SQL = queries("jobqd")
SETTINGS = parse("", "<test>", {})


def publish(conn, name, *, queue="default", max_attempts=None, delivery=None):
    """What a worker's sync_definitions writes for one task or route."""
    conn.execute(
        SQL.tasks_sync,
        {
            "name": name,
            "queue": queue,
            "max_attempts": max_attempts,
            "delivery": delivery,
            "backoff": None,
        },
    )


def process(conn) -> int:
    return conn.execute(
        "INSERT INTO jobqd.processes (host, pid, role, queue)"
        " VALUES ('elsewhere', 4242, 'worker', 'default') RETURNING id"
    ).fetchone()[0]


def expired_job(conn, task: str, locked_by: int, attempt: int = 1) -> int:
    """A running job of `task` whose lease ran out a minute ago."""
    return conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, state, attempt, lease_token, locked_by,"
        " started_at, lease_expires_at) VALUES ('default', %s, 'running', %s,"
        " nextval('jobqd.lease_tokens'), %s, now(), now() - interval '1 minute') RETURNING id",
        (task, attempt, locked_by),
    ).fetchone()[0]


def row(conn, job_id: int) -> dict:
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute("SELECT * FROM jobqd.jobs WHERE id = %s", (job_id,)).fetchone()


# -- item 1: one policy resolver ---------------------------------------------------------------


def test_the_reaper_resolves_delivery_by_route_longest_prefix_first(conn):
    publish(conn, "rx.*", delivery="at_most_once")
    publish(conn, "rx.safe.*", delivery="at_least_once")  # longer prefix wins
    publish(conn, "rx.exact", delivery="at_least_once")  # the exact name beats any route
    owner = process(conn)
    once = expired_job(conn, "rx.a", owner)
    safe = expired_job(conn, "rx.safe.b", owner)
    exact = expired_job(conn, "rx.exact", owner)

    run_once(conn, SETTINGS)

    assert row(conn, once)["state"] == "dead"  # on the old main: queued, to run again
    assert "lease expired" in row(conn, once)["last_error"]
    assert (row(conn, safe)["state"], row(conn, exact)["state"]) == ("queued", "queued")


def test_taking_back_a_dead_workers_jobs_applies_the_routes_policy(conn):
    publish(conn, "rx.*", delivery="at_most_once")
    publish(conn, "mx.*", max_attempts=2)
    dead = process(conn)
    once = expired_job(conn, "rx.a", dead)
    spent = expired_job(conn, "mx.a", dead, attempt=2)
    again = expired_job(conn, "mx.b", dead, attempt=1)

    taken = {job.job_id: job.state for job in release(conn, SQL, [(dead, "killed by SIGKILL")])}

    assert taken == {once: "dead", spent: "dead", again: "queued"}


def test_jobqctl_shows_the_limit_the_reaper_applies(conn, dsn):
    """One task row decides, as in the worker's registry: an exact task that sets no limit
    takes its queue's, not a shorter route's."""
    publish(conn, "lim.*", max_attempts=4)
    publish(conn, "lim.a")
    queue = {"queue": "default", "max_attempts": 7, "delivery": "at_least_once", "backoff": None}
    conn.execute(SQL.queues_sync, queue)
    owner = process(conn)
    exact, routed = expired_job(conn, "lim.a", owner, 4), expired_job(conn, "lim.b", owner, 4)

    limits = {j["id"]: j["effective_max_attempts"] for j in as_json("jobs", dsn=dsn)}
    run_once(conn, SETTINGS)

    assert (limits[exact], limits[routed]) == (7, 4)
    assert (row(conn, exact)["state"], row(conn, routed)["state"]) == ("queued", "dead")


def test_a_killed_worker_and_a_stopped_worker_agree_on_an_at_most_once_route(db, procs):
    """The worker's own release at shutdown and the reaper (after a SIGKILL) both end an
    at-most-once route's job dead; neither runs it twice (the ledger the task writes)."""
    tasks = ("helpers", "policy_tasks")
    with Client(db) as client:
        stopped = client.enqueue("rx.stopped", {"seconds": 60})
        killed = client.enqueue("rx.killed", {"seconds": 60})
    first = start_worker(procs, db, imports=tasks, concurrency=1, lease=2.0, shutdown_timeout=0.2)
    ran = "SELECT count(*) FROM public.ledger WHERE job_id = %s"
    wait_for(lambda: scalar(db, ran, (stopped,)) == 1, what="the first job started")
    os.kill(first.pid, signal.SIGTERM)
    first.join(20)
    second = start_worker(procs, db, imports=tasks, concurrency=1, lease=2.0)
    wait_for(lambda: scalar(db, ran, (killed,)) == 1, what="the second job started")
    os.kill(second.pid, signal.SIGKILL)
    start(procs, db)
    start_worker(procs, db, imports=tasks, concurrency=2, lease=2.0)
    with Client(db) as client:
        wait_for(lambda: client.get(killed).state != "running", what="the lease was reaped")
        assert client.get(stopped).state == "dead"
        assert "at-most-once" in client.get(stopped).last_error
        assert client.get(killed).state == "dead"  # on the old main: queued and run again
        assert "lease expired" in client.get(killed).last_error
    assert (scalar(db, ran, (stopped,)), scalar(db, ran, (killed,))) == (1, 1)


# -- item 5: unknown tasks neither burn attempts nor vanish ---------------------------------------


def test_an_unknown_task_is_released_unspent_shown_and_taken_by_a_node_that_knows_it(
    db, procs, conn, tmp_path, monkeypatch
):
    trap = tmp_path / "imported"
    monkeypatch.setenv("JOBQD_TEST_TRAP", str(trap))
    with Client(db) as client:
        new = client.enqueue("policy.new")
        module_path = client.enqueue("policy_import_trap.run")  # looks like module.function
    old = start_worker(procs, db, poll_interval=0.1)  # an old node: it knows neither task

    def released(job_id, times):
        info = row(conn, job_id)
        seen = released.starts.setdefault(job_id, set())
        if info["state"] == "queued" and info["started_at"] is not None:
            seen.add(info["started_at"])
        return len(seen) >= times and info

    released.starts = {}
    for job_id in (new, module_path):
        info = wait_for(lambda j=job_id: released(j, 3), timeout=30, what="three releases")
        # On the old main: attempt 1, 2, 3 ... and dead after max_attempts.
        assert (info["state"], info["attempt"]) == ("queued", 0)
        assert "unknown task" in info["last_error"] and info["unhandled_since"] is not None
        # Due again only after a delay, so that no node spins on it.
        assert info["run_at"] - info["started_at"] >= timedelta(seconds=1)
    assert not trap.exists(), "a task name was imported"
    assert old.is_alive()

    groups = {g["task"]: g for g in as_json("status", dsn=db)["unhandled"]}
    assert {g["queue"] for g in groups.values()} == {"default"}
    assert groups["policy.new"]["jobs"] == 1 and groups["policy.new"]["dead_in"] > 3000
    text = jobqctl("status", dsn=db)[1]
    assert "unhandled: 1 job(s) of task 'policy.new' in queue default" in text

    # The rolling deploy reaches the node: the old worker goes, one that knows the task comes.
    os.kill(old.pid, signal.SIGTERM)
    old.join(20)
    due = row(conn, new)["run_at"]
    start_worker(procs, db, imports=("helpers", "policy_tasks"), poll_interval=0.1)
    with Client(db) as client:
        wait_for(lambda: client.get(new).state == "succeeded", timeout=90, what="new ran")
        assert client.get(new).attempt == 1
    ended = row(conn, new)
    late = ended["finished_at"] - due
    print(f"\nunknown task ran {late.total_seconds():.2f}s after it came due again")
    assert late <= timedelta(seconds=5)  # taken when due (a worker start on a loaded machine)
    assert not trap.exists()
    groups = {g["task"] for g in as_json("status", dsn=db)["unhandled"]}
    assert groups == {"policy_import_trap.run"}


def test_an_unknown_task_ends_dead_after_the_window(db, procs, conn):
    window = 3.0
    with Client(db) as client:
        gone = client.enqueue("policy.gone")
    start_worker(procs, db, poll_interval=0.1)
    start(procs, db, FAST + f"unknown_task_window: {window}s\n")
    with Client(db) as client:
        wait_for(lambda: client.get(gone).state == "dead", timeout=30, what="dead at the window")
        info = client.get(gone)
    assert info.attempt == 0  # no attempt was spent on it
    assert "unknown task 'policy.gone': no worker knew it for" in info.last_error
    assert "jobqctl retry" in info.last_error
    record = info.errors[-1]
    assert record["kind"] == "UnknownTask"
    since = datetime.fromisoformat(record["unhandled_since"])
    waited = (info.finished_at - since).total_seconds()
    print(f"\nunknown task dead {waited:.2f}s after it was first released (window {window}s)")
    # The window, then at most one reaper interval (300ms) and a loaded machine's slack.
    assert window <= waited <= window + 3.0
    assert as_json("status", dsn=db)["unhandled"] == []


def test_a_retried_job_starts_its_unhandled_window_over(conn):
    """Cancelled while unhandled, then retried: the leader does not end it dead at once."""
    job_id = conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, unhandled_since)"
        " VALUES ('default', 'policy.gone', now() - interval '2 hours') RETURNING id"
    ).fetchone()[0]
    conn.execute("SELECT jobqd.cancel(%s)", (job_id,))
    conn.execute("SELECT jobqd.retry(%s)", (job_id,))
    assert run_once(conn, SETTINGS).unhandled == []
    assert (row(conn, job_id)["state"], row(conn, job_id)["unhandled_since"]) == ("queued", None)


def test_unknown_task_window_is_validated():
    assert parse("", "<test>", {}).unknown_task_window == 3600.0
    assert parse("unknown_task_window: 10m", "<test>", {}).unknown_task_window == 600.0
    with pytest.raises(ConfigError, match=r"unknown_task_window: must be at least 1s"):
        parse("unknown_task_window: 100ms", "<test>", {})

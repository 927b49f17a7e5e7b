"""Maintenance processes against a real Postgres: election, failover, stepping down, the
messages to the master, the leader running all its duties, bundles with real workers, and
poolers in front of the leader session.

Maintenance processes run in spawned processes through the same serve() the daemon forks
(tests/leaders.py); assertions are about rows, locks and exit codes. Each duty has its own
file: test_cron, test_reaper, test_pruner, test_aging.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from datetime import timedelta

import psycopg
import pytest
from faults import Proxy, needs_pgbouncer, pgbouncer
from helpers import scalar, start_worker, wait_for
from leaders import FAST, claimed_leaders, leader, leader_pid, start
from psycopg.conninfo import conninfo_to_dict

from jobqd import Client
from jobqd.config.settings import parse
from jobqd.daemon.ipc import Receiver


@pytest.fixture
def tcp_db(db):
    """`db`, for tests that put a TCP relay (pgbouncer, a proxy) in front of the server: the
    embedded server the harness falls back to listens on a unix socket only."""
    host = conninfo_to_dict(db).get("host") or ""
    if not host or host.startswith("/"):
        pytest.skip("needs the test server on TCP; the embedded fallback has a unix socket only")
    return db


def test_exactly_one_leader_and_failover_after_sigkill(db, procs):
    for _ in range(3):
        start(procs, db)
    alive = {p.pid for p in procs}
    first = wait_for(lambda: leader_pid(db), what="a leader")
    assert first in alive
    wait_for(lambda: claimed_leaders(db, alive) == [first], what="only the lock holder says leader")
    time.sleep(1.5)  # several standby retries later: still the same single leader
    assert leader_pid(db) == first
    assert claimed_leaders(db, alive) == [first]
    assert scalar(db, "SELECT count(*) FROM jobqd.processes WHERE role = 'maintenance'") == 3

    os.kill(first, signal.SIGKILL)
    killed_at = time.monotonic()
    alive.discard(first)
    second = wait_for(
        lambda: (pid := leader_pid(db)) != first and pid, timeout=10, what="a new leader"
    )
    handover = time.monotonic() - killed_at
    assert second in alive
    assert handover < 10
    wait_for(lambda: claimed_leaders(db, alive) == [second], what="one leader claims it")

    # TERM: steps down, releases the lock, removes its row, exits 0; the last one takes over.
    by_pid = {p.pid: p for p in procs}
    os.kill(second, signal.SIGTERM)
    by_pid[second].join(10)
    assert by_pid[second].exitcode == 0
    assert scalar(db, "SELECT count(*) FROM jobqd.processes WHERE pid = %s", (second,)) == 0
    (last,) = alive - {second}
    wait_for(lambda: leader_pid(db) == last, timeout=10, what="the last one leads")


def test_terminated_lock_session_steps_down_and_someone_takes_over(db, procs):
    for _ in range(2):
        start(procs, db)
    before = wait_for(lambda: leader(db), what="a leader")
    with psycopg.connect(db, autocommit=True) as c:
        assert c.execute("SELECT pg_terminate_backend(%s)", (before["backend_pid"],)).fetchone()[0]
    after = wait_for(
        lambda: (found := leader(db)) and found["backend_pid"] != before["backend_pid"] and found,
        timeout=10,
        what="a leader on another session",
    )
    assert after["pid"] in {p.pid for p in procs}
    assert all(p.is_alive() for p in procs)  # stepped down, did not crash
    # The old leader is a registered standby again (or the leader, on its new session).
    wait_for(
        lambda: (
            scalar(
                db,
                "SELECT count(*) FROM jobqd.processes WHERE role = 'maintenance'"
                " AND heartbeat_at > now() - interval '5 seconds'",
            )
            == 2
        ),
        what="both processes heartbeating",
    )


@pytest.fixture
def proxy(tcp_db):
    with Proxy.to(tcp_db) as relay:
        yield relay


def test_leader_behind_a_silent_network_path_steps_down_on_its_own(tcp_db, proxy, procs):
    db = tcp_db
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    cut_off = start(procs, proxy.dsn(db), FAST, writer)
    writer.close()
    receiver = Receiver(reader.fileno())
    os.set_blocking(reader.fileno(), False)
    wait_for(lambda: leader_pid(db) == cut_off.pid, what="the proxied process leads")
    standby = start(procs, db)
    wait_for(lambda: len(claimed_leaders(db, {cut_off.pid, standby.pid})) == 1, what="standby up")

    while receiver.read()[0]:  # what it said while leading
        pass
    proxy.blackhole()
    frozen_at = time.monotonic()
    stepped_down = wait_for(
        lambda: any(m["kind"] == "status" and not m["leader"] for m in receiver.read()[0]),
        timeout=15,
        what="the cut-off leader stepping down",
    )
    stepped_down_after = time.monotonic() - frozen_at
    assert stepped_down and 7 <= stepped_down_after <= 10  # TRUST_WINDOW 8 s, checked twice a s
    wait_for(lambda: leader_pid(db) == standby.pid, timeout=5, what="the standby takes over")
    assert cut_off.is_alive()


def test_status_messages_and_exit_code_for_the_master(db, procs):
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    proc = start(procs, db, FAST, writer)
    writer.close()
    os.set_blocking(reader.fileno(), False)
    receiver = Receiver(reader.fileno())
    messages: list[dict] = []

    def received(predicate):
        more, _ = receiver.read()
        messages.extend(more)
        return any(predicate(m) for m in messages)

    wait_for(lambda: received(lambda m: m["kind"] == "booted"), what="booted")
    assert messages[0] == {
        "kind": "booted",
        "role": "maintenance",
        "process_id": messages[0]["process_id"],
    }
    wait_for(
        lambda: received(lambda m: m["kind"] == "status" and m["leader"]),
        what="status as leader",
    )
    leader_gauge = [
        m["metrics"]["jobqd_leader"] for m in messages if "jobqd_leader" in m.get("metrics", {})
    ]
    assert leader_gauge[-1] == [[[], 1]]
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    assert proc.exitcode == 0
    wait_for(lambda: received(lambda m: m["kind"] == "status" and not m["leader"]), what="last")
    assert scalar(db, "SELECT count(*) FROM jobqd.processes") == 0
    assert leader(db) is None


DUTIES = """
maintenance: {interval: 200ms, standby_retry: 500ms}
reaper: {interval: 300ms, process_grace: 3s}
retention: {succeeded: 1h}
queues:
  default: {}
  aged: {processes: 0, aging: {after: 10s, every: 10s, step: 1, floor: -5}}
"""


def test_leader_removes_silent_processes_before_lease_expiry_and_runs_its_duties(db, procs):
    with Client(db) as client:
        job = client.enqueue("test.sleep", {"seconds": 60})
        waiting = client.enqueue("test.noop", queue="aged")
    with psycopg.connect(db, autocommit=True) as c:
        c.execute(
            "UPDATE jobqd.jobs SET run_at = now() - interval '35 seconds' WHERE id = %s", (waiting,)
        )
        c.execute(
            "INSERT INTO jobqd.jobs (queue, task, state, finished_at)"
            " VALUES ('default', 'old', 'succeeded', now() - interval '2 hours')"
        )
    worker = start_worker(procs, db, concurrency=1, lease=30.0, heartbeat=1.0)
    wait_for(lambda: scalar(db, "SELECT count(*) FROM public.ledger") == 1, what="job started")
    lease_end = scalar(db, "SELECT lease_expires_at FROM jobqd.jobs WHERE id = %s", (job,))
    worker_row = scalar(db, "SELECT locked_by FROM jobqd.jobs WHERE id = %s", (job,))
    os.kill(worker.pid, signal.SIGKILL)
    start(procs, db, DUTIES)
    wait_for(
        lambda: scalar(db, "SELECT state FROM jobqd.jobs WHERE id = %s", (job,)) == "queued",
        timeout=10,
        what="the dead worker's job released",
    )
    assert scalar(db, "SELECT now()") < lease_end - timedelta(seconds=15)
    assert scalar(db, "SELECT count(*) FROM jobqd.processes WHERE id = %s", (worker_row,)) == 0
    assert scalar(db, "SELECT attempt FROM jobqd.jobs WHERE id = %s", (job,)) == 1
    assert f"pid {worker.pid}" in scalar(
        db, "SELECT last_error FROM jobqd.jobs WHERE id = %s", (job,)
    )
    # Aging: waited 35 s, after 10 s, one step per 10 s: 1 + 2 = 3 steps.
    wait_for(
        lambda: scalar(db, "SELECT priority FROM jobqd.jobs WHERE id = %s", (waiting,)) == -3,
        what="the waiting job aged",
    )
    # Pruning starts a few seconds after taking over.
    wait_for(
        lambda: scalar(db, "SELECT count(*) FROM jobqd.jobs WHERE task = 'old'") == 0,
        timeout=10,
        what="the old job pruned",
    )


def test_bundle_callback_runs_once_after_the_last_job_even_when_some_die(db, procs):
    jobs = [("test.noop", {})] * 3 + [("test.discard", {}), ("test.fail", {})]
    with Client(db) as client:
        bundle_id, ids = client.enqueue_bundle(
            jobs, name="nightly", callback="test.record", callback_args={"note": "done"}
        )
    for _ in range(2):
        start_worker(procs, db, concurrency=4)
    with Client(db) as client:
        bundle = wait_for(
            lambda: (b := client.get_bundle(bundle_id)).finished_at and b, what="bundle done"
        )
        assert (bundle.succeeded, bundle.dead, bundle.cancelled) == (3, 2, 0)
        callback = wait_for(
            lambda: (j := client.get(bundle.callback_job_id)).state == "succeeded" and j,
            what="callback ran",
        )
        assert callback.task == "test.record"
        assert callback.args["note"] == "done"
        assert callback.args["bundle"] == {
            "id": bundle_id,
            "name": "nightly",
            "total": 5,
            "succeeded": 3,
            "dead": 2,
            "cancelled": 0,
        }
        states = {client.get(i).state for i in ids}
        assert states == {"succeeded", "dead"}
        finished_last = max(client.get(i).finished_at for i in ids)
        assert callback.created_at >= finished_last
    time.sleep(0.5)
    assert scalar(db, "SELECT count(*) FROM jobqd.jobs WHERE task = 'test.record'") == 1
    with psycopg.connect(db) as c:
        runs = c.execute("SELECT job_id FROM public.ledger WHERE task = 'test.record'").fetchall()
    assert runs == [(bundle.callback_job_id,)]


@needs_pgbouncer
@pytest.mark.parametrize("ignore_options", [False, True], ids=["options-refused", "dropped"])
def test_pgbouncer_in_transaction_mode_is_refused(tcp_db, caplog, ignore_options):
    db = tcp_db
    from jobqd.errors import EXIT_CONFIG
    from jobqd.maintenance.process import Maintenance

    with pgbouncer(db, pool_mode="transaction", ignore_options=ignore_options) as through:
        settings = parse(FAST, "<test>", {"JOBQD_DATABASE_URL": through})
        assert Maintenance(settings, through).run() == EXIT_CONFIG
    explanation = "transaction or statement mode" if ignore_options else "pool_mode = session"
    assert explanation in caplog.text
    assert "docs/pgbouncer.md" in caplog.text
    assert leader(db) is None


@needs_pgbouncer
def test_pgbouncer_in_session_mode_is_fine(tcp_db, procs):
    db = tcp_db
    with pgbouncer(db, pool_mode="session", ignore_options=True) as through:
        proc = start(procs, through)
        wait_for(lambda: leader_pid(db) == proc.pid, what="leads through a session-mode pool")
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(10)
        assert proc.exitcode == 0

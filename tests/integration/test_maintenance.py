"""Maintenance processes against a real Postgres: election, failover, cron across a leader
kill, the reaper with killed workers, the leader's duties, bundles with real workers.

Maintenance processes run in spawned processes through the same serve() the daemon forks;
assertions are about rows, locks and exit codes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from faults import Proxy
from helpers import LEDGER_DSN_ENV, LEDGER_TABLE, scalar, start_worker, wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd import Client
from jobqd.config.settings import parse
from jobqd.daemon.ipc import Receiver
from jobqd.maintenance.cron import tick_text
from jobqd.maintenance.leader import current_leader

FAST = """
maintenance: {interval: 200ms, standby_retry: 500ms}
reaper: {interval: 300ms, process_grace: 30s}
"""


def run_maintenance(yaml_text: str, dsn: str, writer=None) -> None:
    """Target of a spawned maintenance process."""
    os.environ[LEDGER_DSN_ENV] = dsn
    from jobqd.daemon.ipc import Sender
    from jobqd.maintenance.process import serve
    from jobqd.observe.logs import setup_logging

    setup_logging("json", "info", role="maintenance")
    settings = parse(yaml_text, "<test>", {"JOBQD_DATABASE_URL": dsn})
    sender = Sender(writer.fileno()) if writer is not None else None
    raise SystemExit(serve(settings, dsn, sender=sender))


@pytest.fixture
def db(dsn, conn):
    conn.execute(LEDGER_TABLE)
    return dsn


@pytest.fixture
def tcp_db(db):
    """`db`, for tests that put a TCP relay (pgbouncer, a proxy) in front of the server: the
    embedded server the harness falls back to listens on a unix socket only."""
    host = conninfo_to_dict(db).get("host") or ""
    if not host or host.startswith("/"):
        pytest.skip("needs the test server on TCP; the embedded fallback has a unix socket only")
    return db


@pytest.fixture
def procs():
    started: list[multiprocessing.Process] = []
    yield started
    for proc in started:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.join(5)


def start(procs, dsn, yaml_text=FAST, writer=None):
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=run_maintenance, args=(yaml_text, dsn, writer), daemon=True)
    proc.start()
    procs.append(proc)
    return proc


def leader(dsn):
    """The lock holder's row: from pg_locks, so only the real holder counts."""
    with psycopg.connect(dsn, autocommit=True) as c:
        return current_leader(c, "jobqd")


def leader_pid(dsn):
    found = leader(dsn)
    return found["pid"] if found and found["pid"] else None


def claimed_leaders(dsn, alive):
    """OS pids of live maintenance processes whose registration says leader."""
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT pid FROM jobqd.processes"
            " WHERE role = 'maintenance' AND (metadata->>'leader')::boolean"
        ).fetchall()
    return sorted(pid for (pid,) in rows if pid in alive)


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


CRON = (
    FAST
    + """
cron:
  all:
    schedule: "* * * * * *"
    task: test.noop
    misfire: all
  skip:
    schedule: "* * * * * *"
    task: test.noop
    args: {entry: skip}
"""
)


def ticks(dsn, name):
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT t.tick, j.args->>'cron_tick', j.task FROM jobqd.cron_ticks t"
            " JOIN jobqd.jobs j ON j.id = t.job_id WHERE t.name = %s ORDER BY t.tick",
            (name,),
        ).fetchall()


def test_cron_fires_once_per_tick_across_a_leader_kill(db, procs):
    for _ in range(2):
        start(procs, db, CRON)
    first = wait_for(lambda: leader_pid(db), what="a leader")
    wait_for(lambda: len(ticks(db, "all")) >= 4, what="four ticks")
    os.kill(first, signal.SIGKILL)
    killed = scalar(db, "SELECT now()")
    wait_for(lambda: leader_pid(db) not in (None, first), timeout=10, what="a new leader")
    wait_for(
        lambda: (
            scalar(db, "SELECT count(*) FROM jobqd.cron_ticks WHERE tick > %s", (killed,)) >= 10
        ),
        timeout=15,
        what="ticks from the new leader",
    )
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(10)

    # No tick enqueued twice: one job per (entry, tick), and no job outside cron_ticks.
    with psycopg.connect(db) as c:
        dupes = c.execute(
            "SELECT args->>'entry', args->>'cron_tick' FROM jobqd.jobs"
            " GROUP BY 1, 2 HAVING count(*) > 1"
        ).fetchall()
        jobs = c.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0]
    assert dupes == []
    fired_all, fired_skip = ticks(db, "all"), ticks(db, "skip")
    assert jobs == len(fired_all) + len(fired_skip)
    assert all(text == tick_text(tick) for tick, text, _ in fired_all + fired_skip)
    # misfire: all -> every second from the first tick to the last, the handover included.
    seconds = [tick for tick, _, _ in fired_all]
    assert seconds == [seconds[0] + timedelta(seconds=n) for n in range(len(seconds))]
    # misfire: skip -> the handover was shorter than the on-time tolerance: nothing skipped.
    skipped = [tick for tick, _, _ in fired_skip]
    assert skipped == [skipped[0] + timedelta(seconds=n) for n in range(len(skipped))]


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


RETENTION = """
retention: {succeeded: 1h, dead: 1d, idempotency: 2h}
queues:
  default: {}
  keep: {retention: {succeeded: 7d, dead: 30d}}
"""


def test_prune_deletes_only_what_retention_says(conn):
    from jobqd.maintenance.pruner import prune, sync_settings

    rows = [  # queue, state, finished this long ago, pruned?
        ("default", "succeeded", "2 hours", True),
        ("default", "succeeded", "30 minutes", False),
        ("default", "cancelled", "2 hours", True),
        ("default", "dead", "2 hours", False),
        ("default", "dead", "2 days", True),
        ("keep", "succeeded", "2 days", False),
        ("keep", "succeeded", "8 days", True),
        ("keep", "dead", "2 days", False),
        ("keep", "dead", "31 days", True),
        ("elsewhere", "succeeded", "2 hours", True),  # not configured: top-level retention
        ("elsewhere", "succeeded", "10 minutes", False),
    ]
    for queue, state, age, _ in rows * 3:  # three of each, so batches of 2 must loop
        conn.execute(
            "INSERT INTO jobqd.jobs (queue, task, state, finished_at, created_at)"
            " VALUES (%s, %s, %s, now() - %s::interval, now() - %s::interval)",
            (queue, f"{queue}/{state}/{age}", state, age, age),
        )
    conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, created_at) VALUES ('default', 'waiting',"
        " now() - interval '90 days')"
    )
    conn.execute(
        "INSERT INTO jobqd.idempotency_keys VALUES ('gone', 1, now() - interval '1 second'),"
        " ('kept', 2, now() + interval '1 hour')"
    )
    conn.execute(
        "INSERT INTO jobqd.cron (name, last_tick) VALUES ('nightly', now() - interval '3 days')"
    )
    conn.execute(
        "INSERT INTO jobqd.cron_ticks (name, tick, job_id) VALUES"
        " ('nightly', now() - interval '4 days', 1),"
        " ('nightly', (SELECT last_tick FROM jobqd.cron WHERE name = 'nightly'), 2),"
        " ('nightly', now() - interval '10 minutes', 3)"
    )
    conn.execute(
        "INSERT INTO jobqd.bundles (total, finished_at) VALUES"
        " (1, now() - interval '2 days'), (1, now() - interval '2 hours'), (1, NULL)"
    )
    config = parse(RETENTION, "<test>", {"JOBQD_DATABASE_URL": "postgresql:///unused"})

    counts = prune(conn, config, batch=2)

    survivors = {task for (task,) in conn.execute("SELECT task FROM jobqd.jobs").fetchall()}
    expected = {f"{q}/{s}/{a}" for q, s, a, pruned in rows if not pruned} | {"waiting"}
    assert survivors == expected
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 3 * 5 + 1
    assert counts == {
        "succeeded": 9,
        "cancelled": 3,
        "dead": 6,
        "idempotency_keys": 1,
        "cron_ticks": 1,  # the 3-day-old one is the entry's last tick: kept
        "bundles": 1,
    }
    assert prune(conn, config) == dict.fromkeys(counts, 0)
    assert sync_settings(conn, config)
    window = conn.execute("SELECT idempotency_window FROM jobqd.settings").fetchone()[0]
    assert window == timedelta(hours=2)
    assert not sync_settings(conn, config)


def test_aging_moves_waiting_jobs_forward_step_by_step_down_to_the_floor(conn):
    from jobqd.maintenance import aging

    config = parse(
        """
queues:
  default: {}
  bulk: {aging: {after: 10s, every: 10s, step: 2, floor: -5}}
""",
        "<test>",
        {"JOBQD_DATABASE_URL": "postgresql:///unused"},
    )
    cases = [  # queue, state, waited seconds, priority, expected priority
        ("bulk", "queued", 5, 0, 0),  # not waited long enough
        ("bulk", "queued", 15, 0, -2),  # one step at `after`
        ("bulk", "queued", 25, 0, -4),  # and one more per `every`
        ("bulk", "queued", 100, 0, -5),  # not past the floor
        ("bulk", "queued", 25, 10, 6),
        ("bulk", "queued", 100, -10, -10),  # already ahead of the floor: untouched
        ("bulk", "running", 100, 0, 0),
        ("default", "queued", 100, 0, 0),  # no aging configured
    ]
    ids = []
    for queue, state, waited, priority, _ in cases:
        ids.append(
            conn.execute(
                "INSERT INTO jobqd.jobs (queue, task, state, priority, run_at, lease_expires_at,"
                " lease_token) VALUES (%s, 'x', %s, %s, now() - %s * interval '1 second',"
                " CASE WHEN %s = 'running' THEN now() END, CASE WHEN %s = 'running' THEN 1 END)"
                " RETURNING id",
                (queue, state, priority, waited, state, state),
            ).fetchone()[0]
        )

    assert aging.run_once(conn, config, batch=2) == {"bulk": 4}
    assert aging.run_once(conn, config) == {}  # computed from the original: nothing more yet

    got = dict(conn.execute("SELECT id, priority FROM jobqd.jobs").fetchall())
    assert [got[i] for i in ids] == [case[4] for case in cases]
    base = conn.execute("SELECT base_priority FROM jobqd.jobs WHERE id = %s", (ids[4],)).fetchone()[
        0
    ]
    assert base == 10
    # Claim order: the aged job now runs before a fresh job of priority -3.
    fresh = conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, priority) VALUES ('bulk', 'fresh', -3) RETURNING id"
    ).fetchone()[0]
    order = conn.execute(
        "SELECT array_agg(id ORDER BY priority, run_at, id) FROM jobqd.jobs WHERE id = ANY(%s)",
        ([fresh, ids[3]],),
    ).fetchone()[0]
    assert order == [ids[3], fresh]


PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@contextlib.contextmanager
def pgbouncer(dsn: str, *, pool_mode: str, ignore_options: bool):
    """A throw-away pgbouncer in front of the test server; yields a DSN through it."""
    params = conninfo_to_dict(dsn)
    with tempfile.TemporaryDirectory(prefix="jobqd-pgbouncer-") as tmp:
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        ignore = "options,extra_float_digits" if ignore_options else "extra_float_digits"
        Path(tmp, "pgbouncer.ini").write_text(
            f"""[databases]
* = host={params.get("host") or "127.0.0.1"} port={params.get("port") or 5432} user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = {pool_mode}
ignore_startup_parameters = {ignore}
logfile = {tmp}/pgbouncer.log
pidfile = {tmp}/pgbouncer.pid
"""
        )
        command = [PGBOUNCER, "-d", f"{tmp}/pgbouncer.ini"]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            shutil.chown(tmp, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True)
        try:
            through = make_conninfo(dsn, host="127.0.0.1", port=str(port))
            wait_for(lambda: _answers(through), timeout=10, what="pgbouncer up")
            yield through
        finally:
            pid = int(Path(tmp, "pgbouncer.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not Path(tmp, "pgbouncer.pid").exists(), timeout=10, what="down")


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


needs_pgbouncer = pytest.mark.skipif(
    not os.path.exists(PGBOUNCER), reason="pgbouncer is not installed (apt-get install pgbouncer)"
)


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

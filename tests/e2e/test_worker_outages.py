"""The worker's side of issue 10 on real processes and a throw-away cluster: a worker started
while the database is down waits and boots when it returns (same pid, no restart by the
master); an immediate restart is one outage line and one recovery line per worker, with
counts; a blackholed link is cut within lease/3; a SIGKILLed master's workers drain, so every
job that finished has its outcome written, once.

The fixtures (a migrated cluster, a proxy, daemons whose tasks write a ledger) are the outage
tests' own.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from typing import Any

import psycopg
import pytest
from e2e_daemon import alive, enqueue, states
from faults import Proxy, workers
from helpers import wait_for
from runs import audit, read_runs
from test_outages import daemon_config, daemons, db_now, pg, proxy, runs_dir  # noqa: F401

from jobqd.store.connections import RoundTripWatchdog, connect


def messages(daemon, starting: str) -> list[dict[str, Any]]:
    return [r for r in daemon.logs() if r.get("message", "").startswith(starting)]


def test_a_worker_started_while_the_database_is_down_boots_when_it_returns(
    pg,  # noqa: F811
    daemons,  # noqa: F811
):
    # The master waits for the database before it forks; a worker starts during an outage
    # when it replaces one that died meanwhile, and its boot releases its predecessor's jobs.
    daemon = daemons("a", daemon_config(pg.dsn(), processes=1))
    first = daemon.booted("worker default#0")
    pg.stop()
    os.kill(first, signal.SIGKILL)
    waiting = wait_for(
        lambda: messages(daemon, "database unreachable while starting"),
        timeout=30,
        what="the worker waiting for the database",
    )
    waiting_pid = waiting[0]["pid"]
    assert alive(waiting_pid)
    time.sleep(5)  # the outage: the old code exited and was restarted meanwhile
    assert alive(waiting_pid)
    pg.start()
    back = db_now(pg)
    booted = daemon.booted("worker default#0", other_than=first)
    assert booted == waiting_pid, "the worker that waited is the one that booted"
    ids = enqueue(pg.dsn(), "faults.run", {"seconds": 0.05}, count=20)
    wait_for(lambda: states(pg.dsn(), ids) == {"succeeded": 20}, timeout=30, what="jobs done")
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        registered = conn.execute(
            "SELECT min(started_at) FROM jobqd.processes WHERE role = 'worker' AND pid = %s",
            (booted,),
        ).fetchone()[0]
    assert registered is not None
    print(f"worker registered {(registered - back).total_seconds():.2f}s after the database")
    assert (registered - back).total_seconds() < 2.0
    exits = messages(daemon, "worker default#0 exited")
    assert len(exits) == 1, "only the worker killed by the test exited, not its replacement"


def test_an_immediate_restart_is_one_outage_and_one_recovery_per_worker(
    pg,  # noqa: F811
    daemons,  # noqa: F811
    runs_dir,  # noqa: F811
):
    daemon = daemons("a", daemon_config(pg.dsn(), concurrency=8))
    pids = {daemon.booted("worker default#0"), daemon.booted("worker default#1")}
    ids = enqueue(pg.dsn(), "faults.run", {"seconds": 0.1}, count=200)
    wait_for(lambda: len(read_runs(runs_dir)) >= 16, what="jobs running")
    pg.stop("immediate")
    time.sleep(5)  # the outage
    pg.start()
    back_at = db_now(pg)
    wait_for(lambda: states(pg.dsn(), ids) == {"succeeded": 200}, timeout=60, what="all done")
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        first_claim = conn.execute(
            "SELECT min(started_at) FROM jobqd.jobs WHERE id = ANY(%s) AND started_at > %s",
            (ids, back_at),
        ).fetchone()[0]
    resumed = (first_claim - back_at).total_seconds()
    print(f"first claim {resumed:.2f}s after the database accepted connections")
    assert resumed < 2.0
    assert set(workers(daemon)) == pids
    for pid in pids:
        began = [r for r in messages(daemon, "database unreachable") if r["pid"] == pid]
        ended = [r for r in messages(daemon, "database reachable again") if r["pid"] == pid]
        assert len(began) == 1 and len(ended) == 1, (began, ended)
        assert ended[0]["attempts"] >= 1 and ended[0]["outage_seconds"] >= 4
        print(
            f"worker {pid}: outage {ended[0]['outage_seconds']}s, {ended[0]['attempts']} "
            f"attempts, {ended[0]['written']} written, {ended[0]['dropped']} dropped"
        )
    result = audit(pg.dsn(), ids, runs_dir)
    assert result["lost"] == 0 and result["overlaps"] == 0
    assert result["doubled"] == 0, result  # held outcomes were written, not re-run


def test_a_blackholed_round_trip_is_cut_within_its_bound(pg, proxy):  # noqa: F811
    bound = 1.0
    watchdog = RoundTripWatchdog(bound)
    conn = connect(proxy.dsn(pg.dsn()), application_name="watchdog test")
    conn.execute("SELECT 1")
    proxy.blackhole()
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError), watchdog.busy(conn):
        conn.execute("SELECT 1")
    took = time.monotonic() - began
    print(f"blackholed round trip cut after {took:.2f}s (bound {bound}s)")
    assert bound <= took < bound + 0.5
    assert watchdog.tripped == 1
    proxy.heal()
    with connect(proxy.dsn(pg.dsn()), application_name="watchdog test") as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_a_blackholed_worker_cuts_its_link_within_a_third_of_its_lease(
    pg,  # noqa: F811
    proxy: Proxy,  # noqa: F811
    daemons,  # noqa: F811
    runs_dir,  # noqa: F811
):
    config = daemon_config(proxy.dsn(pg.dsn()), processes=1, lease="3s")
    daemon = daemons("a", config)
    pid = daemon.booted("worker default#0")
    ids = enqueue(pg.dsn(), "faults.run", {"seconds": 0.05}, count=5)
    wait_for(lambda: states(pg.dsn(), ids) == {"succeeded": 5}, what="jobs done")
    long_jobs = enqueue(pg.dsn(), "faults.run", {"seconds": 30}, count=2)
    wait_for(lambda: len({r.job for r in read_runs(runs_dir)} & set(long_jobs)) == 2, what="run")
    proxy.blackhole()
    cut_at = time.time()
    began = wait_for(
        lambda: [r for r in messages(daemon, "database unreachable") if r["pid"] == pid],
        timeout=10,
        what="the worker noticing the dead link",
    )[0]
    # The log's timestamp: its heartbeat (every 1 s) is cut 1 s (lease/3) after it was sent.
    noticed = _epoch(began) - cut_at
    print(f"dead link noticed {noticed:.2f}s after the blackhole began (bound 1 s + 1 s)")
    assert noticed < 2.5
    assert "link cut" in began["message"]
    gave_up = wait_for(
        lambda: [r for r in messages(daemon, "lease not renewed in time") if r["pid"] == pid],
        timeout=10,
        what="the worker giving its leases up",
    )
    assert {r["job_id"] for r in gave_up} <= set(long_jobs)
    # Every run ended by its local clock while the database still had its lease valid.
    wait_for(
        lambda: all(r.end is not None for r in read_runs(runs_dir) if r.job in long_jobs),
        what="the long runs ending",
    )
    for run in (r for r in read_runs(runs_dir) if r.job in long_jobs):
        assert run.outcome == "gave up: lease lost" and run.lease_ok is True, run
    proxy.heal()
    healed = time.time()
    more = enqueue(pg.dsn(), "faults.run", {"seconds": 0.05}, count=20)
    wait_for(
        lambda: any(r.pid == pid and r.start > healed for r in read_runs(runs_dir)),
        timeout=5,
        what="the same worker working within 5 s of healing",
    )
    wait_for(lambda: states(pg.dsn(), more) == {"succeeded": 20}, timeout=30, what="done")


def _epoch(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["ts"]).timestamp()


def test_children_of_a_killed_master_drain_and_write_every_outcome(
    pg,  # noqa: F811
    daemons,  # noqa: F811
    runs_dir,  # noqa: F811
):
    daemon = daemons("a", daemon_config(pg.dsn(), concurrency=8))
    pids = {daemon.booted("worker default#0"), daemon.booted("worker default#1")}
    ids = enqueue(pg.dsn(), "faults.run", {"seconds": 0.5}, count=400)
    wait_for(lambda: len(read_runs(runs_dir)) >= 40, what="jobs running")
    daemon.signal(signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: not any(alive(p) for p in pids), timeout=20, what="the orphans to exit")
    runs = [r for r in read_runs(runs_dir) if r.pid in pids]
    assert runs and all(r.end is not None and r.outcome == "done" for r in runs), [
        r for r in runs if r.outcome != "done"
    ]
    assert all(r.start <= killed_at + 0.5 for r in runs), "no claims after the master died"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        rows = dict(
            conn.execute(
                "SELECT id, state || ':' || attempt FROM jobqd.jobs WHERE id = ANY(%s)",
                ([r.job for r in runs],),
            ).fetchall()
        )
    assert {rows[r.job] for r in runs} == {"succeeded:1"}, "every finished run is recorded once"
    print(f"{len(runs)} runs around the master kill, every outcome written")

    daemons("b", daemon_config(pg.dsn(), concurrency=8))  # a new master finishes the rest
    wait_for(lambda: states(pg.dsn(), ids) == {"succeeded": 400}, timeout=90, what="all done")
    result = audit(pg.dsn(), ids, runs_dir)
    assert result["doubled"] == 0 and result["lost"] == 0, result

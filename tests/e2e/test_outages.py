"""Database faults the daemon must ride out (issue 10, "Done when"), each on a throw-away
cluster of its own: an immediate Postgres restart, a half-open link, the database down at
start, a listen port already taken. Outcomes are read from the jobs table and from the ledger
the tasks write (`runs`).

They fail on today's code and are marked xfail(strict) until the fix for issue 10 lands; the
marks go with that fix.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from e2e_daemon import Daemon, alive, base_config, enqueue, states, title
from faults import (
    Cluster,
    Proxy,
    cluster,
    cluster_unavailable,
    free_port,
    get_json,
    launch,
    workers,
)
from helpers import wait_for
from runs import RUNS_DIR_ENV, overlaps, read_runs

from jobqd.store.migrate import migrate


@pytest.fixture
def pg() -> Iterator[Cluster]:
    """A started, migrated throw-away cluster."""
    if reason := cluster_unavailable():
        pytest.skip(reason)
    with cluster(prefix="jobqd-outage-pg-") as made:
        with psycopg.connect(made.dsn(), autocommit=True) as conn:
            migrate(conn, "jobqd")
        yield made


@pytest.fixture
def proxy(pg: Cluster) -> Iterator[Proxy]:
    with Proxy.to(pg.dsn()) as relay:
        yield relay


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """Where the tasks write the ledger of their runs."""
    (tmp_path / "runs").mkdir()
    return tmp_path / "runs"


@pytest.fixture
def daemons(tmp_path, pg: Cluster, runs_dir: Path) -> Iterator[Callable[..., Daemon]]:
    """`daemons(name, config)` starts a daemon whose tasks write their ledger to `runs_dir` and
    check leases on the cluster directly; all are stopped when the test ends."""
    started: list[Daemon] = []

    def start(name: str, config: dict[str, Any]) -> Daemon:
        daemon = launch(
            tmp_path / name,
            config["database"]["url"],
            config,
            ledger_dsn=pg.dsn(),
            env={RUNS_DIR_ENV: str(runs_dir)},
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
        print(f"--- daemon {daemon.dir.name} log (last lines) ---\n{daemon.tail()}")


def daemon_config(dsn: str, **queue: Any) -> dict[str, Any]:
    config = base_config(dsn)
    config["imports"] = ["helpers", "runs"]
    config["queues"]["default"] = {"processes": 2, "concurrency": 4, **queue}
    config["maintenance"] = {"interval": "200ms", "standby_retry": "500ms"}
    return config


def db_now(pg: Cluster) -> datetime:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def count(pg: Cluster, query: str, params: Any = None) -> int:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        return conn.execute(query, params).fetchone()[0]


def test_workers_keep_their_pids_through_an_immediate_restart(pg, daemons, runs_dir):
    daemon = daemons("a", daemon_config(pg.dsn()))
    pids = [daemon.booted("worker default#0"), daemon.booted("worker default#1")]
    ids = enqueue(pg.dsn(), "faults.run", {"seconds": 0.1}, count=200)
    wait_for(lambda: len(read_runs(runs_dir)) >= 16, what="jobs running")

    pg.stop("immediate")
    time.sleep(5)  # the outage
    pg.start()
    back, back_at = time.monotonic(), db_now(pg)

    claimed_since = "SELECT count(*) FROM jobqd.jobs WHERE started_at > %s"
    wait_for(
        lambda: count(pg, claimed_since, (back_at,)) > 0,
        timeout=max(0.0, 5 - (time.monotonic() - back)),
        what="a claim within 5 s of the database's return",
    )
    assert all(alive(pid) and title(pid).startswith("jobqd: worker ") for pid in pids)
    wait_for(lambda: states(pg.dsn(), ids) == {"succeeded": 200}, timeout=60, what="all done")
    assert set(workers(daemon)) == set(pids)


def test_no_job_runs_twice_at_once_across_a_half_open_link(pg, proxy, daemons, runs_dir):
    # Daemon `a` reaches the database through the proxy, `b` directly: while `a` is cut off,
    # `b` leads, reaps `a`'s expired leases and runs those jobs again.
    cut_off = daemons("a", daemon_config(proxy.dsn(pg.dsn()), lease="3s"))
    cut_off_workers = {cut_off.booted("worker default#0"), cut_off.booted("worker default#1")}
    long_jobs = enqueue(pg.dsn(), "faults.run", {"seconds": 20}, count=4)
    wait_for(
        lambda: {r.job for r in read_runs(runs_dir)} == set(long_jobs),
        what="the long jobs running on the cut-off daemon",
    )
    healthy = daemons("b", daemon_config(pg.dsn(), lease="3s"))
    healthy.booted("worker default#0")
    healthy.booted("worker default#1")
    short_jobs = enqueue(pg.dsn(), "faults.run", {"seconds": 0.1}, count=100)

    proxy.blackhole()
    time.sleep(30)  # the fault
    proxy.heal()
    healed, healed_at = time.monotonic(), time.time()
    more_jobs = enqueue(pg.dsn(), "faults.run", {"seconds": 0.1}, count=400)

    def cut_off_resumed() -> bool:
        pids = cut_off_workers | set(workers(cut_off))
        return any(r.pid in pids and r.start > healed_at for r in read_runs(runs_dir))

    ids = long_jobs + short_jobs + more_jobs
    try:
        wait_for(
            cut_off_resumed,
            timeout=max(0.0, 5 - (time.monotonic() - healed)),
            what="the cut-off daemon working within 5 s of healing",
        )
    finally:
        wait_for(
            lambda: states(pg.dsn(), ids) == {"succeeded": len(ids)}, timeout=90, what="all done"
        )
    runs = read_runs(runs_dir)
    assert overlaps(runs, valid_only=False) == []
    assert [r for r in runs if r.end is None] == []


def test_healthz_answers_while_the_database_is_down(pg, daemons):
    port = free_port()
    pg.stop()
    config = daemon_config(pg.dsn())
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    daemon = daemons("a", config)
    wait_for(
        lambda: get_json(port, "/healthz")[0] == 200, timeout=15, what="/healthz, database down"
    )
    assert get_json(port, "/readyz")[0] == 503
    pg.start()
    wait_for(lambda: get_json(port, "/readyz")[0] == 200, timeout=30, what="ready once it is up")
    pg.stop("immediate")
    wait_for(
        lambda: get_json(port, "/readyz")[0] == 503, timeout=15, what="unready once it is down"
    )
    assert get_json(port, "/healthz")[0] == 200
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_a_busy_listen_port_fails_the_start(pg, daemons):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = daemon_config(pg.dsn())
        config["http"] = {"listen": f"127.0.0.1:{port}"}
        daemon = daemons("a", config)
        try:
            code = daemon.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"jobqd kept running with 127.0.0.1:{port} taken")
    assert code != 0
    assert any(
        f"127.0.0.1:{port}" in record.get("message", "") and "in use" in record["message"]
        for record in daemon.logs()
    ), daemon.tail()

"""The database's own health in view (issue 10, part 5) and jobqctl riding out an unreachable
database (part 1): a REPEATABLE READ snapshot pinned on another session, dead tuples made by
updating jobs, read back through `jobqctl status` and the http child's /metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from faults import Proxy, free_port
from helpers import wait_for
from leaders import leader_pid
from leaders import start as start_maintenance
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd import Client

JOBS = 2000
UPDATES = 2
HOLDER = "pinned-report"


def jobqctl(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQD_")}
    done = subprocess.run(
        [sys.executable, "-m", "jobqd.cli.ctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr


def config(tmp_path: Path, dsn: str, health: str, extra: str = "") -> str:
    path = tmp_path / f"jobqd-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(f"database: {{url: '{dsn}'}}\ndatabase_health: {{{health}}}\n{extra}")
    return str(path)


def as_role(dsn: str, role: str) -> str:
    return make_conninfo(dsn, user=role)


@pytest.fixture
def pinned(dsn: str) -> Iterator[psycopg.Connection]:
    """A session holding one REPEATABLE READ snapshot open (idle in transaction), as a long
    report or a forgotten psql would."""
    holder = psycopg.connect(dsn, application_name=HOLDER)
    holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    holder.execute("SELECT count(*) FROM jobqd.jobs").fetchone()
    yield holder
    holder.close()


def make_dead_tuples(dsn: str, conn: psycopg.Connection) -> int:
    """Enqueue JOBS jobs and update each UPDATES times: dead tuples a pinned snapshot keeps."""
    with Client(dsn) as client:
        client.enqueue_many([("t", {"i": i}) for i in range(JOBS)])
    for _ in range(UPDATES):
        conn.execute("UPDATE jobqd.jobs SET priority = priority + 1")
    dead = JOBS * UPDATES
    wait_for(lambda: dead_tuples(conn) >= dead, what="the statistics to count the dead tuples")
    return dead


def dead_tuples(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'jobqd' AND relname = 'jobs'"
    ).fetchone()
    return int(row[0])


def held_for(conn: psycopg.Connection, pid: int) -> float:
    """How long `pid`'s transaction has been open, by the database's clock."""
    row = conn.execute(
        "SELECT extract(epoch FROM now() - xact_start)::float8 FROM pg_stat_activity "
        "WHERE pid = %s",
        (pid,),
    ).fetchone()
    return float(row[0])


def test_status_names_the_pinned_snapshot_and_the_dead_tuples_it_keeps(dsn, conn, pinned, tmp_path):
    dead = make_dead_tuples(dsn, conn)
    pid = pinned.info.backend_pid
    wait_for(lambda: held_for(conn, pid) > 1.5, what="the snapshot to be held over 1.5s")
    measured = held_for(conn, pid)
    cfg = config(tmp_path, dsn, f"holder_age: 1s, dead_tuples: {dead // 2}")

    code, out, err = jobqctl("-c", cfg, "--json", "status")
    assert code == 0, err
    health = json.loads(out)["database"]
    holder = health["vacuum_holder"]
    assert holder["kind"] == "session"
    assert (holder["pid"], holder["application_name"]) == (pid, HOLDER)
    assert holder["state"] == "idle in transaction" and holder["visible"] is True
    assert holder["age"] >= measured > 1.0
    assert health["vacuum_held_back"] is True
    jobs = {t["table"]: t for t in health["tables"]}["jobqd.jobs"]
    assert jobs["dead_tuples"] >= dead and jobs["live_tuples"] >= JOBS
    assert len(health["warnings"]) == 2
    assert f"pid {pid}" in health["warnings"][0]

    code, text, err = jobqctl("-c", cfg, "status")
    assert code == 0, err
    warnings = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, text
    assert f"session pid {pid} ('{HOLDER}', idle in transaction" in warnings[0]
    assert "held back vacuum" in warnings[0] and f"pg_terminate_backend({pid})" in warnings[0]
    assert re.search(r"jobqd\.jobs has [\d,]+ dead tuples .*end the holder above", warnings[1])
    assert "docs/operations.md" in text

    # Under the default thresholds (no -c: 5 minutes, 100,000 dead tuples) it is not news yet.
    code, out, err = jobqctl("--dsn", dsn, "--json", "status")
    assert code == 0, err
    assert json.loads(out)["database"]["warnings"] == []

    # The remedy docs/operations.md gives: end the holder, then VACUUM.
    pinned.rollback()
    conn.execute("VACUUM jobqd.jobs")
    code, out, err = jobqctl("-c", cfg, "--json", "status")
    health = json.loads(out)["database"]
    jobs = {t["table"]: t for t in health["tables"]}["jobqd.jobs"]
    assert jobs["dead_tuples"] < dead // 2 and jobs["last_vacuum"] is not None
    assert health["warnings"] == []


@pytest.fixture
def daemon_role(conn) -> Iterator[str]:
    """A login role with the documented daemon grants and nothing else: no superuser, no
    pg_read_all_stats, so pg_stat_activity hides other roles' state and start times."""
    role = f"jobqd_daemon_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute("SELECT jobqd.grant_daemon(%s)", (role,))
    yield role
    conn.execute(f"DROP OWNED BY {role}")
    conn.execute(f"DROP ROLE {role}")


def test_a_role_without_rights_still_sees_the_holder_and_judges_it_by_transactions(
    dsn, conn, pinned, daemon_role, tmp_path
):
    # pinned is a superuser's session: the daemon role sees its pid, application_name and
    # backend_xmin, but neither its state nor when its transaction began.
    for i in range(30):  # each autocommit UPDATE is one transaction past the snapshot
        conn.execute("SELECT jobqd.enqueue('q', 't', jsonb_build_object('i', %s::int))", (i,))
    cfg = config(tmp_path, as_role(dsn, daemon_role), "holder_xid_age: 20")

    code, out, err = jobqctl("-c", cfg, "--json", "status")
    assert code == 0, err
    health = json.loads(out)["database"]
    holder = health["vacuum_holder"]
    assert (holder["pid"], holder["application_name"]) == (pinned.info.backend_pid, HOLDER)
    assert holder["visible"] is False and holder["state"] is None and holder["age"] is None
    assert holder["xid_age"] >= 30
    assert health["vacuum_held_back"] is True
    assert "state hidden from this role" in health["warnings"][0]
    assert "transactions" in health["warnings"][0]


CHILD = """
import sys
from jobqd import config
from jobqd.http import server as http
from jobqd.observe.logs import setup_logging
setup_logging("json", "info", role="http")
settings = config.load(sys.argv[1])
sys.exit(http.serve(settings, settings.database.url, feed_fd=int(sys.argv[2])))
"""


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    for family in families:
        if family.name.startswith("jobqd_database_") and family.name != "jobqd_database_up":
            assert "counts the database once" in family.documentation, family.name
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def test_metrics_expose_the_holder_dead_tuples_and_last_vacuum(dsn, conn, pinned, tmp_path, procs):
    dead = make_dead_tuples(dsn, conn)
    pid = pinned.info.backend_pid
    database = conninfo_to_dict(dsn)["dbname"]
    port = free_port()
    cfg = config(
        tmp_path,
        dsn,
        f"holder_age: 1s, dead_tuples: {dead // 2}",
        f"http: {{listen: '127.0.0.1:{port}'}}\n",
    )
    read, feed = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", CHILD, cfg, str(read)], pass_fds=(read,))
    os.close(read)
    # The database-wide gauges come from the node whose maintenance child leads: be that node.
    start_maintenance(procs, dsn)
    maintenance = wait_for(lambda: leader_pid(dsn), timeout=30, what="a leader")
    children = {"maintenance": {"role": "maintenance", "pid": maintenance}}
    os.write(feed, json.dumps({"kind": "health", "children": children}).encode() + b"\n")
    try:
        holder_key = (
            "jobqd_database_vacuum_holder",
            tuple(
                sorted(
                    {
                        "database": database,
                        "kind": "session",
                        "pid": str(pid),
                        "application_name": HOLDER,
                        "name": "",
                        "state": "idle in transaction",
                    }.items()
                )
            ),
        )

        def named() -> dict | None:
            try:
                found = scrape(port)
            except OSError:
                return None
            return found if found.get(holder_key) == 1 else None

        found = wait_for(named, timeout=30, what="/metrics to name the holder")
        measured = held_for(conn, pid)
        by_db = (("database", database),)
        jobs = (("database", database), ("table", "jobqd.jobs"))
        assert found[("jobqd_database_vacuum_holder_age_seconds", by_db)] > 1.0
        assert found[("jobqd_database_vacuum_holder_age_seconds", by_db)] <= measured + 1.5
        assert found[("jobqd_database_vacuum_holder_xid_age", by_db)] >= 0
        assert found[("jobqd_database_dead_tuples", jobs)] >= dead
        assert found[("jobqd_database_live_tuples", jobs)] >= JOBS
        assert found[("jobqd_database_last_vacuum_timestamp_seconds", jobs)] == 0
        assert found[("jobqd_database_health_warnings", by_db)] == 2

        pinned.rollback()
        conn.execute("VACUUM jobqd.jobs")
        vacuumed_at = conn.execute(
            "SELECT extract(epoch FROM last_vacuum)::float8 FROM pg_stat_user_tables "
            "WHERE schemaname = 'jobqd' AND relname = 'jobs'"
        ).fetchone()[0]

        def cleared() -> dict | None:
            found = scrape(port)
            return found if found[("jobqd_database_health_warnings", by_db)] == 0 else None

        found = wait_for(cleared, timeout=15, what="/metrics to clear the warnings")
        assert holder_key not in found
        assert found[("jobqd_database_dead_tuples", jobs)] < dead // 2
        assert found[("jobqd_database_last_vacuum_timestamp_seconds", jobs)] == pytest.approx(
            vacuumed_at, abs=0.001
        )
    finally:
        os.close(feed)  # EOF: the child exits as when its master is gone
        try:
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()


def test_jobqctl_retries_a_closed_port_then_exits_3_saying_what_to_check():
    port = free_port()
    dsn = f"postgresql://postgres:s3cret-pw@127.0.0.1:{port}/jobs_db"
    started = time.monotonic()
    code, out, err = jobqctl("--dsn", dsn, "--wait", "3s", "status")
    elapsed = time.monotonic() - started
    assert code == 3, err
    assert out == ""
    lines = err.strip().splitlines()
    progress = lines[:-1]
    # 500ms, 1s, then the 1.5s left of the 3s: four attempts, a line before each retry.
    assert [re.search(r"retrying in (\S+) \((\d)/4\)$", line).groups() for line in progress] == [
        ("500ms", "2"),
        ("1s", "3"),
        ("1.5s", "4"),
    ]
    assert all(
        line.startswith(f"jobqctl: cannot reach the database at 127.0.0.1:{port}/jobs_db: ")
        for line in progress
    )
    assert "Connection refused" in progress[0]
    final = lines[-1]
    assert final.startswith(f"jobqctl: cannot connect to PostgreSQL at 127.0.0.1:{port}/jobs_db")
    assert "check that the server is running" in final
    assert "gave up after 4 attempts" in final and "--wait 1m" in final
    assert "s3cret-pw" not in err
    assert 3.0 <= elapsed < 3.0 + 6.0  # the wait, plus interpreter start on a loaded machine


def test_jobqctl_does_not_retry_what_waiting_cannot_fix(server_dsn):
    dsn = make_conninfo(server_dsn, dbname=f"no_such_db_{uuid.uuid4().hex[:6]}")
    started = time.monotonic()
    code, _, err = jobqctl("--dsn", dsn, "--wait", "30s", "status")
    assert code == 3
    assert "retrying" not in err and "does not exist" in err
    assert time.monotonic() - started < 15  # far below the 30s it was allowed to wait


def test_jobqctl_waits_for_a_database_that_comes_back(dsn):
    with Proxy.to(dsn) as proxy:
        proxy.cut()  # connections are closed as soon as they are accepted
        command = [sys.executable, "-m", "jobqd.cli.ctl", "--dsn", proxy.dsn(dsn)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQD_")}
        ctl = subprocess.Popen(
            [*command, "--wait", "30s", "--json", "status"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            first = ctl.stderr.readline()
            assert "retrying in" in first, first
            proxy.heal()
            healed = time.monotonic()
            out, err = ctl.communicate(timeout=30)
        finally:
            if ctl.poll() is None:
                ctl.kill()
    assert ctl.returncode == 0, err
    assert "database" in json.loads(out)
    # The next try comes within the longest pause (RETRY_CAP, 5s), plus interpreter headroom.
    assert time.monotonic() - healed < 5.0 + 5.0


def test_status_watch_reconnects_after_the_link_is_cut(dsn):
    with Proxy.to(dsn) as proxy:
        command = [sys.executable, "-m", "jobqd.cli.ctl", "--dsn", proxy.dsn(dsn), "--json"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQD_")}
        watch = subprocess.Popen(
            [*command, "--wait", "30s", "status", "--watch", "--interval", "200ms"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            before = json.loads(watch.stdout.readline())
            proxy.cut()
            assert "lost the database connection" in watch.stderr.readline()
            assert "retrying in" in watch.stderr.readline()
            proxy.heal()
            after = json.loads(watch.stdout.readline())
            while after["time"] <= before["time"]:  # lines printed before the cut
                after = json.loads(watch.stdout.readline())
            assert watch.poll() is None
        finally:
            watch.kill()
            watch.wait()

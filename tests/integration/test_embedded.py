"""The embedded PostgreSQL (pgserver): started on demand, shared by a second process on the
same data directory, stopped when the last user exits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import wait_for

pytest.importorskip("pgserver")

HOLDER = textwrap.dedent(
    """
    import sys, psycopg
    from jobqd.store.embedded import start
    from jobqd.store.migrate import migrate
    uri = start(sys.argv[1])
    with psycopg.connect(uri, autocommit=True) as conn:
        migrate(conn, "jobqd")
        job = conn.execute("SELECT jobqd.enqueue('q', 't')").fetchone()[0]
    print(uri, job, flush=True)
    sys.stdin.readline()  # hold the server until told to exit
    """
)


def _postmaster_pid(data_dir: Path) -> int | None:
    pidfile = data_dir / "postmaster.pid"
    if not pidfile.exists():
        return None
    return int(pidfile.read_text().split()[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_second_process_shares_the_server_and_last_one_stops_it(tmp_path):
    data_dir = tmp_path / "pgdata"
    holders = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append((proc, proc.stdout.readline().split()))
    (first, (uri_a, job_a)), (second, (uri_b, job_b)) = holders
    assert uri_a == uri_b
    assert (int(job_a), int(job_b)) == (1, 2)  # one database, migrated once
    postmaster = _postmaster_pid(data_dir)
    assert postmaster and _alive(postmaster)

    first.communicate("\n", timeout=30)
    assert _alive(postmaster), "the server must outlive the first of its users"
    second.communicate("\n", timeout=30)
    wait_for(lambda: not _alive(postmaster), timeout=20, what="embedded server stopped")

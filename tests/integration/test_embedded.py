"""The embedded PostgreSQL (pgserver): started on demand, shared by a second process on the
same data directory, stopped when the last user is gone, however it went (its keeper), and
found without being started (jobqctl's way)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
from helpers import wait_for

from jobqd.store import embedded

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


def _holder(data_dir: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().split()


def test_second_process_shares_the_server_and_last_one_stops_it(embedded_dir):
    data_dir = embedded_dir / "pgdata"
    assert embedded.find(data_dir) is None
    (first, (uri_a, job_a)), (second, (uri_b, job_b)) = _holder(data_dir), _holder(data_dir)
    assert uri_a == uri_b == embedded.find(data_dir)  # what jobqctl finds is what they use
    assert (int(job_a), int(job_b)) == (1, 2)  # one database, migrated once
    postmaster = _postmaster_pid(data_dir)
    assert postmaster and _alive(postmaster)

    first.communicate("\n", timeout=30)
    assert _alive(postmaster), "the server must outlive the first of its users"
    second.communicate("\n", timeout=30)
    wait_for(lambda: not _alive(postmaster), timeout=20, what="embedded server stopped")
    assert embedded.find(data_dir) is None


def test_a_sigkilled_user_leaves_no_server_behind(embedded_dir):
    """pgserver stops the server from an atexit hook only; the keeper stops it when the
    process that started it is SIGKILLed, and takes the dead pid off pgserver's list (else the
    next user would never stop it: the list would never be down to itself)."""
    data_dir = embedded_dir / "pgdata"
    holder, (uri, _) = _holder(data_dir)
    postmaster = _postmaster_pid(data_dir)
    with psycopg.connect(uri) as conn:
        assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone() == (1,)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    wait_for(lambda: not _alive(postmaster), timeout=30, what="the keeper to stop the server")
    assert json.loads((data_dir / ".handle_pids.json").read_text()) == []
    assert embedded.find(data_dir) is None

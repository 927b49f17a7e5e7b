"""Starting and stopping where it matters to operators (issue 10, deliverables 4 and 8): the
daemon refuses a transaction-mode pgbouncer with exit 78 instead of looping, the message for
pgbouncer's refused `options` names the setting to change, and the http child answers
through a whole drain until the last worker has exited."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from e2e_daemon import alive, base_config, enqueue
from faults import free_port
from helpers import wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd.errors import EXIT_CONFIG

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
needs_pgbouncer = pytest.mark.skipif(
    not os.path.exists(PGBOUNCER), reason="pgbouncer is not installed (apt-get install pgbouncer)"
)


@contextlib.contextmanager
def pgbouncer(dsn: str, *, pool_mode: str, ignore_options: bool) -> Iterator[str]:
    """A throw-away pgbouncer in front of the test server; yields a DSN through it."""
    params = conninfo_to_dict(dsn)
    host = params.get("host") or ""
    if not host or host.startswith("/"):
        pytest.skip("needs the test server on TCP; the embedded fallback has a unix socket only")
    with tempfile.TemporaryDirectory(prefix="jobqd-pgbouncer-") as tmp:
        port = free_port()
        ignore = "options,extra_float_digits" if ignore_options else "extra_float_digits"
        Path(tmp, "pgbouncer.ini").write_text(
            f"""[databases]
* = host={host} port={params.get("port") or 5432} user=postgres
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


@needs_pgbouncer
@pytest.mark.parametrize("ignore_options", [True, False], ids=["transaction", "options-refused"])
def test_behind_a_transaction_mode_pgbouncer_the_daemon_exits_78(jobqd, ledger, ignore_options):
    with pgbouncer(ledger, pool_mode="transaction", ignore_options=ignore_options) as through:
        config = base_config(through)
        daemon = jobqd(config)
        try:
            code = daemon.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("jobqd kept running behind a transaction-mode pgbouncer")
    assert code == EXIT_CONFIG
    records = daemon.logs()
    refusal = next(r for r in records if r.get("level") == "CRITICAL")
    if ignore_options:
        assert "transaction or statement mode" in refusal["message"]
    else:
        assert "ignore_startup_parameters = options" in refusal["message"]
    assert "not starting" in refusal["message"]
    # Refused before any worker or maintenance child was forked: nothing to restart.
    started = [r for r in records if r.get("message", "").startswith("started ")]
    assert started == []


def get(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_http_answers_through_a_drain_until_the_last_worker_exits(jobqd, ledger):
    port = free_port()
    config = base_config(ledger)
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    config["shutdown_timeout"] = "20s"
    daemon = jobqd(config)
    worker = daemon.booted("worker default#0")
    daemon.booted("http")
    (job,) = enqueue(ledger, "test.sleep", {"seconds": 3})
    wait_for(
        lambda: daemon.children().get(worker, "").startswith("jobqd: worker default#0 1/"),
        what="the job running",
    )
    daemon.signal(signal.SIGTERM)
    answers: list[int | None] = []  # /healthz, asked while the worker drains
    while alive(worker):
        answers.append(get(port, "/healthz"))
        time.sleep(0.1)
    assert len(answers) > 10, "the drain took a few seconds: the job had 3 to run"
    assert set(answers) == {200}, answers
    assert daemon.wait(20) == 0
    with psycopg.connect(ledger, autocommit=True) as conn:
        state = conn.execute("SELECT state FROM jobqd.jobs WHERE id = %s", (job,)).fetchone()[0]
    assert state == "succeeded"

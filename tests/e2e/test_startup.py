"""Starting and stopping where it matters to operators (issue 10, deliverables 4 and 8): the
daemon refuses a transaction-mode pgbouncer with exit 78 instead of looping, the message for
pgbouncer's refused `options` names the setting to change, and the http child answers
through a whole drain until the last worker has exited."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from e2e_daemon import alive, base_config, enqueue
from faults import free_port, needs_pgbouncer, pgbouncer
from helpers import wait_for

from jobqd.errors import EXIT_CONFIG


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

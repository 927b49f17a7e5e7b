"""Every death says why (issue 10, deliverable 3): a job that kills its process ends dead
after its attempts with the exit in its errors while the queue carries on, and a child that
keeps dying after it booted is a crash loop in the log, `jobqctl status`, /readyz and
/metrics. Outcomes are read from the jobs table, jobqctl's JSON and the http child's answers.
(A SIGKILL and a kill for child_timeout are named in tests/e2e/test_daemon.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import psycopg
from e2e_daemon import base_config, enqueue, states
from faults import free_port, get_json
from helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families

POISON_MODULE = """
import os

from jobqd import task


@task("poison.exit")
def exit_now(job):
    os._exit(1)  # the whole worker process dies, as with a segfault or an OOM kill
"""


def status_json(dsn: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "jobqd.cli.ctl", "--dsn", dsn, "--json", "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def job_row(dsn: str, job_id: int) -> tuple[str, int, str, list[dict[str, Any]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT state, attempt, last_error, errors FROM jobqd.jobs WHERE id = %s", (job_id,)
        ).fetchone()


def test_a_poison_job_ends_dead_naming_the_exit_and_the_crash_loop_shows(jobqd, ledger, tmp_path):
    (tmp_path / "poison.py").write_text(POISON_MODULE)
    port = free_port()
    config = base_config(ledger)
    config["imports"] = ["helpers", "poison"]
    config["queues"] = {"default": {"processes": 1, "concurrency": 2}}
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    daemon = jobqd(config)
    daemon.booted("worker default#0")
    with psycopg.connect(ledger, autocommit=True) as conn:
        (poison,) = conn.execute(
            "SELECT jobqd.enqueue('default', 'poison.exit', '{}', max_attempts => 3)"
        ).fetchone()
    others = enqueue(ledger, "test.record", count=30)

    wait_for(lambda: job_row(ledger, poison)[0] == "dead", timeout=60, what="the poison job dead")
    _, attempt, last_error, errors = job_row(ledger, poison)
    assert attempt == 3
    assert last_error.startswith("worker process exited: exit status 1 (process ")
    assert [e["kind"] for e in errors] == ["WorkerExited"] * 3
    assert all(e["message"].startswith("worker process exited: exit status 1") for e in errors)
    wait_for(lambda: states(ledger, others) == {"succeeded": 30}, timeout=60, what="the others")

    # Three deaths after boot within the window: a crash loop, logged once, in status and
    # /readyz and /metrics, while the queue carries on.
    looping = [
        r
        for r in daemon.logs()
        if "is crash-looping" in r.get("message", "") and r.get("child") == "worker default#0"
    ]
    assert len(looping) == 1 and "after it had booted" in looping[0]["message"]
    loops = wait_for(
        lambda: status_json(ledger)["crash_loops"], timeout=15, what="the loop in jobqctl status"
    )
    assert [(loop["child"], loop["last_exit"]) for loop in loops] == [
        ("worker default#0", "exit status 1")
    ]
    code, body = get_json(port, "/readyz")
    assert code == 503 and "crash-looping: worker default#0" in body["error"], body
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    looping_gauge = {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "jobqd_child_crash_looping"
    }
    assert looping_gauge[(("queue", "default"), ("role", "worker"))] == 1
    text = subprocess.run(
        [sys.executable, "-m", "jobqd.cli.ctl", "--dsn", ledger, "status"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "crash loop: " in text and "worker default#0" in text

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0

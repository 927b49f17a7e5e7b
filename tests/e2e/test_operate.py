"""Operating running daemons: /metrics against the ledger, cluster-wide pause, jobqctl status."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict

from e2e_daemon import base_config, enqueue, ledger_count, states
from helpers import scalar, wait_for
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def counters(text: str) -> dict[str, dict[str, float]]:
    """{sample name: {task: value summed over queues}} from a /metrics body."""
    found: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name][sample.labels.get("task", "")] += sample.value
    return found


def jobqctl(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQD_")}
    done = subprocess.run(
        [sys.executable, "-m", "jobqd.cli.ctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def test_metrics_counters_match_the_ledger(nodes, ledger):
    port = free_port()
    config = base_config(ledger)
    config["queues"]["default"] = {"processes": 2, "concurrency": 4}
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    daemon = nodes(config)
    base = f"http://127.0.0.1:{port}"
    daemon.booted("worker default#0")
    daemon.booted("worker default#1")
    wait_for(lambda: get(base + "/readyz")[0] == 200, what="/readyz to say ready")
    assert get(base + "/healthz")[0] == 200

    ids = enqueue(ledger, "test.record", count=200) + enqueue(ledger, "test.fail", count=5)
    wait_for(
        lambda: states(ledger, ids) == {"succeeded": 200, "dead": 5},
        timeout=60,
        what="every job to end",
    )
    attempts = ledger_count(ledger)
    assert attempts == 200 + 5 * 3

    def settled() -> dict | None:
        status, text = get(base + "/metrics")
        found = counters(text) if status == 200 else {}
        started = found.get("jobqd_jobs_started_total", {})
        # The database gauges come from the leader's node only: wait for it to lead too.
        leads = found.get("jobqd_leader", {}).get("") == 1
        return found if sum(started.values()) == attempts and leads else None

    found = wait_for(settled, timeout=15, what="/metrics to count every attempt")
    assert found["jobqd_jobs_started_total"]["test.record"] == 200
    assert found["jobqd_jobs_succeeded_total"]["test.record"] == 200
    assert found["jobqd_jobs_failed_total"]["test.fail"] == 15
    assert found["jobqd_jobs_retried_total"]["test.fail"] == 10
    assert found["jobqd_jobs_dead_total"]["test.fail"] == 5
    assert found["jobqd_job_duration_seconds_count"]["test.record"] == 200
    # Counted in the database: queued, running and dead (finished ones are the counters' job).
    assert found["jobqd_queue_jobs"][""] == 5

    code, out, err = jobqctl("-c", str(daemon.config_path), "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    roles = sorted(p["role"] for p in status["processes"])
    assert roles == ["http", "maintenance", "worker", "worker"]  # http: the node health row
    [queue] = status["queues"]
    assert (queue["succeeded_1h"], queue["dead"]) == (200, 5)
    wait_for(
        lambda: json.loads(jobqctl("-c", str(daemon.config_path), "status", "--json")[1])["leader"],
        what="a leader",
    )


def test_pause_on_one_node_stops_claiming_on_another(nodes, ledger):
    config = base_config(ledger)
    config["queues"]["default"] = {"processes": 1, "concurrency": 2, "poll_interval": "1s"}
    first, second = nodes(config), nodes(config)
    first.booted("worker default#0")
    second.booted("worker default#0")

    sleepers = enqueue(ledger, "test.sleep", {"seconds": 3}, count=4)
    wait_for(lambda: states(ledger, sleepers) == {"running": 4}, what="both nodes busy")
    # Claimed is not yet started: wait until all four task bodies wrote their ledger rows.
    wait_for(lambda: ledger_count(ledger) == 4, what="the four sleepers to start")
    by_node = scalar(ledger, "SELECT count(DISTINCT pid) FROM public.ledger")
    assert by_node == 2, "each node should be running two of the sleepers"

    code, _, err = jobqctl("-c", str(first.config_path), "pause", "default")
    assert code == 0, err
    paused_at = time.monotonic()
    later = enqueue(ledger, "test.record", count=10)
    poll = 1.0
    while time.monotonic() - paused_at < 3 * poll:
        assert states(ledger, later) == {"queued": 10}, "a node claimed from a paused queue"
        time.sleep(0.1)
    wait_for(lambda: states(ledger, sleepers) == {"succeeded": 4}, what="running jobs to finish")
    assert ledger_count(ledger, "task = 'finished'") == 4
    assert states(ledger, later) == {"queued": 10}

    assert jobqctl("-c", str(second.config_path), "resume", "default")[0] == 0
    wait_for(lambda: states(ledger, later) == {"succeeded": 10}, what="claims to resume")


def leader_gauge(base: str) -> float | None:
    status, text = get(base + "/metrics")
    if status != 200:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "jobqd_leader":
            return next((s.value for s in family.samples), None)
    return None


def test_leadership_in_metrics_and_status_comes_from_the_lock(nodes, ledger):
    """A frozen leader keeps its last word ("I lead"); /metrics and the master's status line
    follow the lock instead: 0 and "leader: no" once the database ended its session."""
    port = free_port()
    config = base_config(ledger)
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    config["maintenance"] = {"interval": "200ms", "standby_retry": "500ms", "leader_timeout": "2s"}
    daemon = nodes(config)
    base = f"http://127.0.0.1:{port}"
    maintenance = daemon.booted("maintenance")
    wait_for(lambda: leader_gauge(base) == 1, timeout=15, what="jobqd_leader 1")

    def master_line() -> str:
        status, body = get(base + "/healthz")
        return json.loads(body).get("master", "") if status == 200 else ""

    assert "leader: yes" in wait_for(lambda: "leader: yes" in master_line() and master_line())
    os.kill(maintenance, signal.SIGSTOP)
    try:
        wait_for(lambda: leader_gauge(base) == 0, timeout=10, what="jobqd_leader 0 while frozen")
        wait_for(lambda: "leader: no" in master_line(), timeout=10, what="status: leader: no")
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
        held += "(SELECT oid FROM pg_database WHERE datname = current_database())"
        assert scalar(ledger, held) == 0
    finally:
        os.kill(maintenance, signal.SIGCONT)
    wait_for(lambda: leader_gauge(base) == 1, timeout=15, what="leading again after SIGCONT")

"""/metrics of real daemons after real jobs: two nodes on one database, the database-wide
gauges from the leader's node only, capacity, pickup latency, per-process figures, build info,
OpenMetrics on request, and `promtool check metrics` on a real scrape."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import time
import urllib.request
from importlib.metadata import version

import psycopg
import pytest
from e2e_daemon import base_config, enqueue, states
from faults import free_port
from helpers import scalar, wait_for
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    """(Content-Type, body) of one GET /metrics."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def by_name(found: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (sample, labels), value in found.items() if sample == name}


def process(role: str, queue: str = "", index: str = "") -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"role": role, "queue": queue, "index": index}.items()))


def node_config(ledger: str, port: int, processes: int, concurrency: int) -> dict:
    config = base_config(ledger)
    config["queues"]["default"] = {"processes": processes, "concurrency": concurrency}
    config["http"] = {"listen": f"127.0.0.1:{port}"}
    config["maintenance"] = {"interval": "200ms", "standby_retry": "500ms"}
    return config


def test_two_nodes_export_capacity_latency_processes_and_the_database_once(nodes, ledger):
    began = time.time()
    ports = free_port(), free_port()
    first = nodes(node_config(ledger, ports[0], processes=2, concurrency=3))
    second = nodes(node_config(ledger, ports[1], processes=1, concurrency=2))
    for daemon, workers in ((first, 2), (second, 1)):
        for index in range(workers):
            daemon.booted(f"worker default#{index}")
        daemon.booted("maintenance")

    ids = enqueue(ledger, "test.record", count=40)
    later = enqueue(ledger, "test.record", count=3)
    with psycopg.connect(ledger, autocommit=True) as conn:  # due in ten minutes: stay queued
        conn.execute(
            "UPDATE jobqd.jobs SET run_at = now() + interval '10 minutes' WHERE id = ANY(%s)",
            (later,),
        )
    wait_for(lambda: states(ledger, ids) == {"succeeded": 40}, timeout=30, what="40 jobs")
    waited = scalar(
        ledger,
        "SELECT sum(extract(epoch FROM started_at - created_at))::float8 FROM jobqd.jobs "
        "WHERE id = ANY(%s) AND attempt = 1",
        (ids,),
    )

    def both() -> tuple[Samples, Samples] | None:
        found = tuple(samples(scrape(port)[1]) for port in ports)
        waits = sum(sum(by_name(f, "jobqd_job_queue_wait_seconds_count").values()) for f in found)
        leaders = [f[("jobqd_leader", ())] for f in found]
        return found if waits == 40 and sorted(leaders) == [0, 1] else None

    found = wait_for(both, timeout=20, what="both nodes to count 40 claims, one leader")
    leading, standby = found if found[0][("jobqd_leader", ())] == 1 else found[::-1]

    # Database-wide gauges: only the leader's node exports them, so sum() over nodes is right.
    queued = (("queue", "default"), ("state", "queued"))
    assert leading[("jobqd_queue_jobs", queued)] == 3
    assert by_name(standby, "jobqd_queue_jobs") == {}
    assert by_name(standby, "jobqd_database_dead_tuples") == {}
    assert by_name(leading, "jobqd_database_dead_tuples")
    assert leading[("jobqd_database_up", ())] == standby[("jobqd_database_up", ())] == 1

    # Capacity beside the busy slots, per node.
    assert found[0][("jobqd_workers_slots", (("queue", "default"),))] == 6
    assert found[1][("jobqd_workers_slots", (("queue", "default"),))] == 2
    assert found[0][("jobqd_workers_busy", (("queue", "default"),))] == 0

    # Pickup latency: one observation per claimed job, on the database's clock.
    wait_sum = sum(sum(by_name(f, "jobqd_job_queue_wait_seconds_sum").values()) for f in found)
    assert wait_sum == pytest.approx(waited, abs=1e-3)
    inf = (("le", "+Inf"), ("queue", "default"))
    assert sum(f[("jobqd_job_queue_wait_seconds_bucket", inf)] for f in found) == 40

    # Build info.
    [(labels, value)] = by_name(found[0], "jobqd_build_info").items()
    info = dict(labels)
    assert value == 1
    assert info["version"] == version("jobqd")
    assert info["python"] == platform.python_version()
    assert info["psycopg"] == psycopg.__version__

    # Every process of the first node, measured.
    rss = by_name(found[0], "jobqd_process_resident_memory_bytes")
    expected = {
        process("master"),
        process("http"),
        process("maintenance"),
        process("worker", "default", "0"),
        process("worker", "default", "1"),
    }
    assert set(rss) == expected
    assert all(value > 10 * 2**20 for value in rss.values())
    started = by_name(found[0], "jobqd_process_start_time_seconds")
    assert all(began - 2 <= value <= time.time() for value in started.values()), started
    cpu = by_name(found[0], "jobqd_process_cpu_seconds_total")
    assert cpu[process("worker", "default", "0")] > 0
    restarts = by_name(found[0], "jobqd_process_restarts_total")
    assert restarts[process("worker", "default", "1")] == 0

    # A worker killed: its restart is counted for it alone, and its replacement is measured.
    killed = first.child("worker default#1")
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    first.booted("worker default#1", other_than=killed)

    def restarted() -> Samples | None:
        now = samples(scrape(ports[0])[1])
        worker = process("worker", "default", "1")
        count = now.get(("jobqd_process_restarts_total", worker))
        return now if count == 1 and ("jobqd_process_start_time_seconds", worker) in now else None

    now = wait_for(restarted, timeout=20, what="the restart to be counted")
    assert now[("jobqd_process_restarts_total", process("worker", "default", "0"))] == 0
    assert now[("jobqd_child_restarts_total", (("role", "worker"),))] == 1
    replaced = now[("jobqd_process_start_time_seconds", process("worker", "default", "1"))]
    assert replaced > started[process("worker", "default", "1")]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus)")
def test_promtool_accepts_a_real_scrape_and_openmetrics_on_request(nodes, ledger):
    port = free_port()
    daemon = nodes(node_config(ledger, port, processes=1, concurrency=4))
    daemon.booted("worker default#0")
    ids = enqueue(ledger, "test.record", count=5) + enqueue(ledger, "test.fail", count=2)
    wait_for(lambda: states(ledger, ids) == {"succeeded": 5, "dead": 2}, timeout=30, what="jobs")
    wait_for(
        lambda: (
            samples(scrape(port)[1]).get(
                ("jobqd_jobs_dead_total", (("queue", "default"), ("task", "test.fail")))
            )
            == 2
        ),
        what="/metrics to count the dead jobs",
    )
    content_type, body = scrape(port)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # OpenMetrics when the scraper asks for it, as Prometheus does.
    accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"
    content_type, body = scrape(port, accept)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    names = {family.name for family in openmetrics_families(body)}
    assert {"jobqd_jobs_started", "jobqd_job_queue_wait_seconds", "jobqd_build_info"} <= names

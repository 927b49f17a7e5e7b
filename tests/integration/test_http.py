"""The http child as a real process, fed over a pipe the way the master feeds it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from faults import cluster, cluster_unavailable, free_port
from helpers import scalar, wait_for
from leaders import leader_pid
from leaders import start as start_maintenance
from prometheus_client.parser import text_string_to_metric_families

from jobqd import Client
from jobqd.observe.metrics import MetricStore, define_jobqd_metrics
from jobqd.store.migrate import migrate

TOKEN = "s3cret-token"
CHILD = """
import os, sys
from jobqd import config
from jobqd.http import server as http
from jobqd.observe.logs import setup_logging
setup_logging("json", "info", role="http")
settings = config.load(sys.argv[1])
sys.exit(http.serve(settings, settings.database.url, feed_fd=int(sys.argv[2])))
"""


def health(booted: bool = True, maintenance_pid: int | None = None) -> dict:
    return {
        "kind": "health",
        "master_alive_at": time.time(),
        "ready": True,
        "stopping": False,
        "status": "test",
        "children": {
            "worker default#0": {"role": "worker", "booted": booted, "crash_looping": False},
            "maintenance": {
                "role": "maintenance",
                "booted": True,
                "crash_looping": False,
                "pid": maintenance_pid,
            },
            "http": {"role": "http", "booted": False, "crash_looping": False},
        },
    }


class HttpChild:
    """A running http child, its feed pipe, and a way to call it."""

    def __init__(
        self,
        tmp: Path,
        dsn: str,
        *,
        token: str | None = TOKEN,
        max_body: str = "4KiB",
        http: str = "",
        env: dict[str, str] | None = None,
    ):
        """`http`: more keys of the http section (`, max_claim: 5`); `env`: the child's."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        path = tmp / f"jobqd-{self.port}.yaml"
        path.write_text(
            f"database: {{url: '{dsn}'}}\n"
            f"http: {{listen: '127.0.0.1:{self.port}', max_body: {max_body}{http}}}\n"
        )
        read, self.feed = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "JOBQD_HTTP_TOKEN"} | (env or {})
        if token:
            env["JOBQD_HTTP_TOKEN"] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(read)], pass_fds=(read,), env=env
        )
        os.close(read)
        self.booted = True
        self.maintenance_pid: int | None = None  # the node's leader candidate, for /metrics
        self._feeding = threading.Event()
        self._feeder: threading.Thread | None = None
        wait_for(self._listening, timeout=15, what="the http child to listen")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def send(self, *messages: dict) -> None:
        os.write(self.feed, b"".join(json.dumps(m).encode() + b"\n" for m in messages))

    def start_feeding(self, snapshot: dict | None = None) -> None:
        """Feed like the master: the whole state every half second."""
        self._feeding.set()

        def run() -> None:
            while self._feeding.is_set():
                messages = [health(self.booted, self.maintenance_pid)]
                if snapshot is not None:
                    messages.insert(0, {"kind": "metrics", "snapshot": snapshot})
                self.send(*messages)
                time.sleep(0.5)

        self._feeder = threading.Thread(target=run, daemon=True)
        self._feeder.start()

    def stop_feeding(self) -> None:
        self._feeding.clear()
        if self._feeder is not None:
            self._feeder.join()

    def call(
        self,
        path: str,
        *,
        method: str = "GET",
        body=None,
        token: str | None = None,
        raw: bytes | None = None,
    ):
        """(status, parsed JSON or text) for one request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def close(self) -> int:
        self.stop_feeding()
        with contextlib.suppress(OSError):
            os.close(self.feed)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def children(tmp_path):
    started: list[HttpChild] = []

    def start(dsn: str, **kwargs) -> HttpChild:
        child = HttpChild(tmp_path, dsn, **kwargs)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_health_and_exit_on_eof(children, dsn, procs):
    store = MetricStore()
    metrics = define_jobqd_metrics(store)
    metrics.jobs_succeeded.inc("default", "t", amount=7)
    metrics.job_duration.observe(0.02, "default", "t")
    metrics.job_duration.observe(3.0, "default", "t")
    with Client(dsn) as client:
        client.enqueue_many([("t", {}), ("t", {}), ("t", {})])
        client.enqueue("t", delay=600)
        client.pause("idle")
    child = children(dsn)
    assert child.call("/healthz")[0] == 503  # nothing from the master yet
    child.start_feeding(store.snapshot())
    wait_for(lambda: child.call("/healthz")[0] == 200, what="healthz after the first feed")

    status, text = child.call("/metrics")
    assert status == 200
    found = samples(text)
    assert found[("jobqd_jobs_succeeded_total", (("queue", "default"), ("task", "t")))] == 7
    assert found[("jobqd_database_up", ())] == 1
    # No maintenance child of this node holds the leader lock: no database-wide gauges.
    assert found[("jobqd_leader", ())] == 0
    assert not any(name == "jobqd_queue_jobs" for name, _ in found)

    start_maintenance(procs, dsn)
    child.maintenance_pid = wait_for(lambda: leader_pid(dsn), timeout=30, what="a leader")
    found = wait_for(
        lambda: (f := samples(child.call("/metrics")[1]))[("jobqd_leader", ())] == 1 and f,
        what="/metrics to see this node lead",
    )
    assert found[("jobqd_queue_jobs", (("queue", "default"), ("state", "queued")))] == 4
    assert found[("jobqd_queue_jobs", (("queue", "idle"), ("state", "queued")))] == 0
    assert found[("jobqd_job_duration_seconds_count", (("queue", "default"), ("task", "t")))] == 2
    assert found[("jobqd_database_up", ())] == 1

    child.stop_feeding()
    wait_for(lambda: child.call("/healthz")[0] == 503, timeout=15, what="healthz to go 503")
    assert "silent" in child.call("/healthz")[1]["error"]
    child.start_feeding()
    wait_for(lambda: child.call("/healthz")[0] == 200, what="healthz back to 200")
    assert child.close() == 0  # EOF on the feed: the master is gone


def test_readyz_checks_migrations_and_children(children, empty_dsn, dsn):
    unmigrated = children(empty_dsn)
    unmigrated.start_feeding()
    status, body = unmigrated.call("/readyz")
    assert status == 503
    assert body["checks"]["migrations"].startswith("pending: 0001_init")
    assert body["checks"]["database"] == "ok"

    child = children(dsn)
    child.booted = False
    child.start_feeding()
    wait_for(
        lambda: (
            child.call("/readyz")[1].get("checks", {}).get("children") != "ok"
            and child.call("/readyz")[0] == 503
        ),
        what="readyz to see the unbooted worker",
    )
    assert "worker default#0" in child.call("/readyz")[1]["checks"]["children"]
    child.booted = True
    wait_for(lambda: child.call("/readyz")[0] == 200, what="readyz once every child booted")


def test_json_api(children, dsn):
    child = children(dsn)
    status, body = child.call("/jobs", method="POST", body={"task": "t"})
    assert (status, body) == (401, {"error": "missing or wrong bearer token"})
    assert child.call("/jobs", method="POST", body={"task": "t"}, token="wrong")[0] == 401

    status, body = child.call(
        "/jobs",
        method="POST",
        token=TOKEN,
        body={
            "task": "send",
            "args": {"to": 7},
            "queue": "mail",
            "priority": -1,
            "delay": "10m",
            "dedup_key": "k1",
        },
    )
    assert status == 201
    job_id = body["id"]
    assert scalar(dsn, "SELECT run_at > now() + interval '9 minutes' FROM jobqd.jobs") is True
    status, again = child.call(
        "/jobs",
        method="POST",
        token=TOKEN,
        body={"task": "send", "queue": "mail", "dedup_key": "k1"},
    )
    assert (status, again["id"]) == (201, job_id)

    status, job = child.call(f"/jobs/{job_id}", token=TOKEN)
    assert status == 200
    assert (job["task"], job["args"], job["queue"], job["priority"]) == (
        "send",
        {"to": 7},
        "mail",
        -1,
    )
    assert child.call("/jobs/999999", token=TOKEN)[0] == 404
    assert child.call("/jobs/abc", token=TOKEN)[0] == 400
    assert child.call(f"/jobs/{job_id}")[0] == 401

    status, body = child.call("/queues", token=TOKEN)
    assert status == 200
    assert [(q["queue"], q["scheduled"]) for q in body["queues"]] == [("mail", 1)]

    for bad, message in (
        ({"args": {}}, "'task' is required"),
        ({"task": "t", "colour": 1}, "unknown keys ['colour']"),
        ({"task": "t", "priority": "high"}, "'priority' must be an integer"),
        ({"task": "t", "delay": "soon"}, "'delay' must be"),
        ({"task": "t", "run_at": "2030-01-01T00:00:00"}, "with a zone"),
        ({"task": "t", "delay": 1, "run_at": "2030-01-01T00:00:00Z"}, "not both"),
        ({"task": "t", "max_attempts": 0}, "max_attempts"),
        ({"task": "x" * 201}, "task"),
        ([1, 2], "JSON object"),
    ):
        status, body = child.call("/jobs", method="POST", body=bad, token=TOKEN)
        assert status == 400, (bad, body)
        assert message in body["error"], (bad, body)
    status, body = child.call("/jobs", method="POST", raw=b"{nope", token=TOKEN)
    assert status == 400 and "not JSON" in body["error"]
    status, body = child.call(
        "/jobs", method="POST", body={"task": "t", "args": {"blob": "x" * 5000}}, token=TOKEN
    )
    assert status == 413 and "http.max_body" in body["error"]
    assert child.call("/jobs", method="PUT", token=TOKEN)[0] == 405
    assert child.call("/nowhere")[0] == 404
    assert scalar(dsn, "SELECT count(*) FROM jobqd.jobs") == 1


def test_api_is_disabled_without_a_token(children, dsn):
    child = children(dsn, token=None)
    status, body = child.call("/jobs", method="POST", body={"task": "t"}, token="anything")
    assert status == 503
    assert body["error"].startswith("API disabled: set JOBQD_HTTP_TOKEN")


# -- a Postgres cluster of this test's own, to stop and start -----------------------------------


@pytest.fixture
def own_cluster():
    if reason := cluster_unavailable():
        pytest.skip(reason)
    with cluster(prefix="jobqd-http-pg-") as pg:
        dsn = pg.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, "jobqd")
        yield dsn, pg.start, pg.stop


def test_readyz_follows_the_database_down_and_back(children, own_cluster):
    dsn, start, stop = own_cluster
    child = children(dsn)
    child.start_feeding()
    wait_for(lambda: child.call("/readyz")[0] == 200, what="ready with the database up")
    stop()
    wait_for(lambda: child.call("/readyz")[0] == 503, what="unready with the database down")
    status, body = child.call("/readyz")
    assert body["checks"]["database"].startswith("unreachable")
    assert child.call("/healthz")[0] == 200  # liveness does not depend on the database
    status, text = child.call("/metrics")
    assert status == 200 and samples(text)[("jobqd_database_up", ())] == 0
    start()
    wait_for(lambda: child.call("/readyz")[0] == 200, timeout=30, what="ready again")

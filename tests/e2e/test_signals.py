"""Stopping: TERM drains, a second TERM stops fast, a killed master leaves no children behind."""

from __future__ import annotations

import os
import signal
import time

from e2e_daemon import alive, base_config, enqueue, ledger_count, states
from helpers import wait_for


def _started(dsn: str, ids: list[int]) -> bool:
    return ledger_count(dsn, "task = 'test.sleep' AND job_id = ANY(%s)", (ids,)) == len(ids)


def test_sigterm_lets_running_jobs_finish_then_exits_0(jobqd, ledger):
    config = base_config(ledger)
    config["queues"]["default"] = {"processes": 2, "concurrency": 10}
    config["shutdown_timeout"] = "20s"
    daemon = jobqd(config)
    daemon.booted("worker default#0")
    daemon.booted("worker default#1")
    ids = enqueue(ledger, "test.sleep", {"seconds": 2}, count=20)
    wait_for(lambda: _started(ledger, ids), what="20 jobs running")

    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert time.monotonic() - began < 10
    assert ledger_count(ledger, "task = 'finished' AND job_id = ANY(%s)", (ids,)) == 20
    assert states(ledger, ids) == {"succeeded": 20}


def test_sigterm_releases_jobs_still_running_at_the_shutdown_timeout(jobqd, ledger):
    config = base_config(ledger)
    config["queues"]["default"] = {"processes": 1, "concurrency": 4}
    config["shutdown_timeout"] = "2s"
    daemon = jobqd(config)
    daemon.booted("worker default#0")
    ids = enqueue(ledger, "test.sleep", {"seconds": 30}, count=4)
    wait_for(lambda: _started(ledger, ids), what="4 jobs running")

    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    took = time.monotonic() - began
    assert took < 2 + 2, f"took {took:.1f}s to stop with shutdown_timeout 2s"
    assert states(ledger, ids) == {"queued": 4}


def test_a_second_sigterm_stops_fast_and_releases_the_jobs(jobqd, ledger):
    config = base_config(ledger)
    config["shutdown_timeout"] = "60s"
    daemon = jobqd(config)
    daemon.booted("worker default#0")
    ids = enqueue(ledger, "test.sleep", {"seconds": 30}, count=2)
    wait_for(lambda: _started(ledger, ids), what="2 jobs running")

    daemon.signal(signal.SIGTERM)
    daemon.wait_log(lambda r: "draining" in r.get("message", ""))
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert time.monotonic() - began < 3
    assert states(ledger, ids) == {"queued": 2}


def test_a_killed_master_leaves_no_children_behind(jobqd, ledger):
    config = base_config(ledger)
    config["queues"]["default"] = {"processes": 2, "concurrency": 2}
    config["shutdown_timeout"] = "2s"  # orphans drain this long (issue 10), then release
    daemon = jobqd(config)
    daemon.booted("worker default#0")
    daemon.booted("worker default#1")
    ids = enqueue(ledger, "test.sleep", {"seconds": 30}, count=2)
    wait_for(lambda: _started(ledger, ids), what="2 jobs running")
    children = daemon.children()
    assert len([t for t in children.values() if t.startswith("jobqd: worker")]) == 2

    os.kill(daemon.pid, signal.SIGKILL)
    assert daemon.wait(5) == -signal.SIGKILL
    wait_for(
        lambda: not any(alive(pid) for pid in children),
        timeout=10,
        what=f"children {sorted(children)} to exit after the master died",
    )
    # They drained, then gave the unfinished jobs back rather than leave them to lease expiry.
    assert states(ledger, ids) == {"queued": 2}

"""SIGHUP reloads the config: only children whose settings changed are replaced; a broken file
changes nothing."""

from __future__ import annotations

import signal

from e2e_daemon import alive, base_config, enqueue, states
from helpers import wait_for


def _two_queues(dsn: str) -> dict:
    config = base_config(dsn)
    config["queues"] = {
        "a": {"processes": 1, "concurrency": 2},
        "b": {"processes": 1, "concurrency": 2},
    }
    return config


def test_hup_replaces_the_workers_of_the_changed_queue_only(jobqd, ledger):
    config = _two_queues(ledger)
    daemon = jobqd(config)
    a0, b0 = daemon.booted("worker a#0"), daemon.booted("worker b#0")

    config["queues"]["a"]["concurrency"] = 3
    config["queues"]["c"] = {"processes": 1, "concurrency": 1}
    daemon.write_config(config)
    daemon.signal(signal.SIGHUP)

    new_a0 = daemon.booted("worker a#0", other_than=a0)
    daemon.booted("worker c#0")
    wait_for(lambda: not alive(a0), what="the old worker a#0 to exit")
    assert alive(b0) and daemon.booted("worker b#0") == b0
    wait_for(
        lambda: daemon.children().get(new_a0, "").startswith("jobqd: worker a#0 0/3"),
        what="the new worker a#0 with 3 slots",
    )
    reloaded = daemon.wait_log(lambda r: r.get("message", "").startswith("reloaded"))
    # maintenance is replaced too: it sees every queue's settings
    assert reloaded["replaced"] == ["worker a#0", "maintenance"]
    assert reloaded["started"] == ["worker c#0"] and reloaded["retired"] == []

    ids = enqueue(ledger, "test.record", queue="a", count=3)
    ids += enqueue(ledger, "test.record", queue="c", count=3)
    wait_for(lambda: states(ledger, ids) == {"succeeded": 6}, what="jobs on a and c to run")


def test_hup_with_a_broken_config_keeps_the_running_children(jobqd, ledger):
    config = _two_queues(ledger)
    daemon = jobqd(config)
    before = {daemon.booted("worker a#0"), daemon.booted("worker b#0")}

    daemon.config_path.write_text(
        daemon.config_path.read_text().replace("concurrency: 2", "concurrency: lots", 1)
    )
    daemon.signal(signal.SIGHUP)

    failed = daemon.wait_log(lambda r: r.get("message", "").startswith("reload failed"))
    assert failed["level"] == "ERROR"
    error = daemon.find_log(lambda r: "concurrency: expected an integer" in r.get("message", ""))
    assert f"{daemon.config_path}:" in error["message"]
    assert all(alive(pid) for pid in before)
    workers = {p for p, t in daemon.children().items() if t.startswith("jobqd: worker")}
    assert workers == before

    ids = enqueue(ledger, "test.record", queue="b", count=3)
    wait_for(lambda: states(ledger, ids) == {"succeeded": 3}, what="jobs to run after the reload")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0


def test_hup_with_an_unimportable_module_changes_nothing(jobqd, ledger):
    """What `jobqd --check` rejects, a reload rejects: checked in a helper process, so the
    master imports no user code, and the running children stay as they are."""
    config = _two_queues(ledger)
    daemon = jobqd(config)
    before = {daemon.booted("worker a#0"), daemon.booted("worker b#0")}
    maintenance = daemon.booted("maintenance")

    config["imports"] = ["helpers", "no_such_module_anywhere"]
    config["queues"]["a"]["concurrency"] = 3  # would replace worker a#0 if it were applied
    daemon.write_config(config)
    daemon.signal(signal.SIGHUP)

    failed = daemon.wait_log(lambda r: r.get("message", "").startswith("reload failed"))
    assert failed["level"] == "ERROR" and "1 error(s)" in failed["message"]
    error = daemon.find_log(lambda r: "no_such_module_anywhere" in r.get("message", ""))
    assert error["message"].startswith(f"reload: {daemon.config_path}:")
    assert not daemon.find_log(lambda r: r.get("message", "").startswith("reloaded"))
    workers = {p for p, t in daemon.children().items() if t.startswith("jobqd: worker")}
    assert workers == before and alive(maintenance)
    assert daemon.children()[maintenance].startswith("jobqd: maintenance")

    ids = enqueue(ledger, "test.record", queue="a", count=3)
    wait_for(lambda: states(ledger, ids) == {"succeeded": 3}, what="jobs to run after the reload")
    assert {p for p, t in daemon.children().items() if t.startswith("jobqd: worker")} == before
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0

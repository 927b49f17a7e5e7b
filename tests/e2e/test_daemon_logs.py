"""A real daemon's log, read the way a person (text) or a collector (JSON) reads it: start and
end lines per job on a queue with `log_jobs`, one line per retry, snooze and death elsewhere,
every job line naming job id, queue, task and attempt, no payload, the host in JSON, and text
lines without the noise."""

from __future__ import annotations

import re
import socket

from e2e_daemon import base_config, enqueue, states
from helpers import wait_for

SECRET = "hunter2-not-for-logs"


def config(ledger: str, fmt: str) -> dict:
    settings = base_config(ledger)
    settings["log"] = {"format": fmt, "level": "info"}
    settings["queues"] = {
        "default": {"processes": 1, "concurrency": 4},
        "loud": {"processes": 1, "concurrency": 4, "log_jobs": True},
    }
    return settings


def test_job_lines_in_json(jobqd, ledger):
    daemon = jobqd(config(ledger, "json"))
    daemon.booted("worker loud#0")
    daemon.booted("worker default#0")
    secret = {"secret": SECRET}
    loud = {
        task: enqueue(ledger, task, secret, queue="loud")[0]
        for task in ("test.record", "test.retry_after", "test.snooze_once", "test.fail")
    }
    loud["test.discard"] = enqueue(ledger, "test.discard", secret, queue="loud")[0]
    quiet = {task: enqueue(ledger, task, secret)[0] for task in ("test.record", "test.fail")}
    ids = [*loud.values(), *quiet.values()]
    wait_for(
        lambda: states(ledger, ids) == {"succeeded": 4, "dead": 3}, timeout=30, what="all jobs"
    )
    daemon.wait_log(
        lambda r: r.get("job_id") == quiet["test.fail"] and r.get("outcome") == "dead",
        what="the last death's line",
    )
    records = daemon.logs()
    lines = [r for r in records if str(r.get("event", "")).startswith("job_")]

    def about(job: int) -> list[tuple]:
        return [
            (r["event"], r.get("outcome"), r["attempt"], r["level"])
            for r in lines
            if r["job_id"] == job
        ]

    assert about(loud["test.record"]) == [
        ("job_started", None, 1, "INFO"),
        ("job_ended", "succeeded", 1, "INFO"),
    ]
    assert about(loud["test.retry_after"]) == [
        ("job_started", None, 1, "INFO"),
        ("job_ended", "retried", 1, "INFO"),
        ("job_started", None, 2, "INFO"),
        ("job_ended", "succeeded", 2, "INFO"),
    ]
    # A snooze spends no attempt: the job runs again as attempt 1.
    assert about(loud["test.snooze_once"]) == [
        ("job_started", None, 1, "INFO"),
        ("job_ended", "snoozed", 1, "INFO"),
        ("job_started", None, 1, "INFO"),
        ("job_ended", "succeeded", 1, "INFO"),
    ]
    assert [a for a in about(loud["test.fail"]) if a[0] == "job_ended"] == [
        ("job_ended", "retried", 1, "INFO"),
        ("job_ended", "retried", 2, "INFO"),
        ("job_ended", "dead", 3, "WARNING"),
    ]
    assert about(loud["test.discard"])[-1] == ("job_ended", "dead", 1, "WARNING")
    # Without log_jobs, starts and successes are debug lines; retries and deaths still show.
    assert about(quiet["test.record"]) == []
    assert about(quiet["test.fail"]) == [
        ("job_ended", "retried", 1, "INFO"),
        ("job_ended", "retried", 2, "INFO"),
        ("job_ended", "dead", 3, "WARNING"),
    ]

    def ended(job: int, outcome: str) -> dict:
        return next(r for r in lines if r["job_id"] == job and r.get("outcome") == outcome)

    assert ended(loud["test.retry_after"], "retried")["message"].endswith(
        "retrying in 50ms: come back later"
    )
    assert ended(loud["test.snooze_once"], "snoozed")["message"].startswith("snoozed for 50ms")
    dead = ended(quiet["test.fail"], "dead")
    assert re.fullmatch(
        r"dead after \S+ \(attempt 3 of 3\): ValueError: boom on attempt 3", dead["message"]
    )
    assert ended(loud["test.discard"], "dead")["message"].endswith(": discarded: not worth it")
    succeeded = ended(loud["test.record"], "succeeded")
    assert 0 <= succeeded["duration"] < 10
    assert succeeded["message"].startswith("succeeded in ")

    host = socket.gethostname()
    for record in records:
        assert record["host"] == host
        if "job_id" in record:
            assert {"queue", "task", "attempt"} <= set(record), record
            assert record["queue"] == ("default" if record["job_id"] in quiet.values() else "loud")
    assert SECRET not in daemon.log_path.read_text()


def test_text_lines_a_person_can_follow(jobqd, ledger):
    daemon = jobqd(config(ledger, "text"))
    job = enqueue(ledger, "test.retry_after", {"secret": SECRET}, queue="loud")[0]
    wait_for(lambda: states(ledger, [job]) == {"succeeded": 1}, timeout=30, what="the job")
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    worker = rf"{stamp} INFO  worker loud#0\[\d+\] job {job} test.retry_after on loud"

    def text() -> str:
        return daemon.log_path.read_text()

    wait_for(lambda: re.search(rf"{worker}, attempt 2: succeeded in \S+$", text(), re.M))
    log = text()
    assert re.search(rf"^{worker}, attempt 1: started$", log, re.M), log
    assert re.search(
        rf"^{worker}, attempt 1: failed after \S+, retrying in 50ms: come back later$",
        log,
        re.M,
    ), log
    assert re.search(rf"^{stamp} INFO  master\[\d+\] started worker loud#0 pid=\d+$", log, re.M)
    assert re.search(rf"^{stamp} INFO  worker loud#0\[\d+\] worker started: 4 slots", log, re.M)
    for noise in ("child=", "child_role=", "child_pid=", "index=", "exit_status=", "['"):
        assert noise not in log, noise
    assert SECRET not in log

"""The daemon runs jobs, restarts what dies, and keeps going when one kind of child cannot boot."""

from __future__ import annotations

import os
import signal
import time

import psycopg
from e2e_daemon import Daemon, base_config, daemon_env, enqueue, ledger_count, states
from helpers import scalar, wait_for

from jobqd.errors import EXIT_BOOT_FAILED


def test_jobs_enqueued_with_sql_are_run(jobqd, ledger):
    config = base_config(ledger)
    config["queues"]["default"] = {"processes": 2, "concurrency": 4}
    daemon = jobqd(config)
    first, second = daemon.booted("worker default#0"), daemon.booted("worker default#1")

    ids = enqueue(ledger, "test.record", count=30)
    wait_for(lambda: states(ledger, ids) == {"succeeded": 30}, what="30 jobs to succeed")
    assert ledger_count(ledger) == 30

    titles = daemon.children()
    assert titles[first].startswith("jobqd: worker default#0 ")
    assert titles[second].startswith("jobqd: worker default#1 ")
    started = [r for r in daemon.logs() if r.get("message", "").startswith("started worker")]
    assert {(r["role"], r["child_role"], r["queue"], r["child_pid"]) for r in started} == {
        ("master", "worker", "default", first),
        ("master", "worker", "default", second),
    }
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0


def test_killed_worker_is_restarted_and_its_job_runs_again_at_once(jobqd, ledger):
    config = base_config(ledger)
    # A lease far longer than the test: the job must not wait for it to expire.
    config["queues"]["default"] = {"processes": 1, "concurrency": 2, "lease": "10m"}
    daemon = jobqd(config)
    worker = daemon.booted("worker default#0")
    [job] = enqueue(ledger, "test.sleep", {"seconds": 1})
    wait_for(lambda: ledger_count(ledger, "job_id = %s", (job,)), what="the job to start")

    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    replacement = daemon.booted("worker default#0", other_than=worker)
    assert time.monotonic() - killed_at < 2.0, "the worker was not restarted within 2s"
    assert replacement != worker
    exit_line = daemon.wait_log(lambda r: r.get("child_pid") == worker and "signal" in r)
    assert exit_line["signal"] == "SIGKILL" and "out of memory?" in exit_line["message"]

    # The master saw the worker die, so its replacement takes the job back at once (with the
    # reaper's backoff of 1s for a first attempt) instead of after the 10 minute lease.
    wait_for(
        lambda: states(ledger, [job]) == {"succeeded": 1}, timeout=10, what="the job to run again"
    )
    with psycopg.connect(ledger, autocommit=True) as conn:
        runs = conn.execute(
            "SELECT attempt, pid FROM public.ledger WHERE job_id = %s AND task = 'test.sleep' "
            "ORDER BY attempt",
            (job,),
        ).fetchall()
        [(error,)] = conn.execute("SELECT errors FROM jobqd.jobs WHERE id = %s", (job,))
        dead_rows = conn.execute(
            "SELECT count(*) FROM jobqd.processes WHERE pid = %s", (worker,)
        ).fetchone()[0]
    assert runs == [(1, worker), (2, replacement)]
    assert error[0]["kind"] == "WorkerExited" and f"pid {worker}" in error[0]["message"]
    assert error[0]["message"].startswith(
        "worker process exited: killed by SIGKILL (out of memory?) (process "
    )
    assert dead_rows == 0, "the dead worker's registration is removed"
    assert daemon.find_log(lambda r: r.get("job_id") == job and "released" in r["message"])


def test_a_hung_worker_is_killed_after_child_timeout_and_its_job_runs_again(jobqd, ledger):
    config = base_config(ledger)
    config["child_timeout"] = "5s"
    config["database"]["statement_timeout"] = "3s"  # a child_timeout must outlast it
    config["queues"]["default"] = {"processes": 1, "concurrency": 2, "lease": "10m"}
    daemon = jobqd(config)
    worker = daemon.booted("worker default#0")
    [job] = enqueue(ledger, "test.sleep", {"seconds": 1})
    wait_for(lambda: ledger_count(ledger, "job_id = %s", (job,)), what="the job to start")

    os.kill(worker, signal.SIGSTOP)  # alive, but it will never report again
    stopped_at = time.monotonic()
    replacement = daemon.booted("worker default#0", other_than=worker)
    assert 5.0 <= time.monotonic() - stopped_at < 9.0
    hung = daemon.find_log(
        lambda r: r.get("child_pid") == worker and "(child_timeout)" in r.get("message", "")
    )
    assert hung is not None and hung["level"] == "ERROR"
    exit_line = daemon.wait_log(lambda r: r.get("child_pid") == worker and "signal" in r)
    assert exit_line["signal"] == "SIGKILL" and "out of memory" not in exit_line["message"]
    assert "killed after child_timeout" in exit_line["message"]

    wait_for(
        lambda: states(ledger, [job]) == {"succeeded": 1}, timeout=10, what="the job to run again"
    )
    started = "job_id = %s AND pid = %s AND task = 'test.sleep'"
    assert ledger_count(ledger, started, (job, replacement)) == 1
    with psycopg.connect(ledger, autocommit=True) as conn:
        [(errors,)] = conn.execute("SELECT errors FROM jobqd.jobs WHERE id = %s", (job,))
    assert errors[0]["message"].startswith("worker process exited: killed after child_timeout")


CRASHING_MODULE = '''
"""Fails to import in the process whose title contains $CRASH_IN: a worker of one queue."""
import os
from setproctitle import getproctitle

if os.environ["CRASH_IN"] in getproctitle():
    raise RuntimeError("this queue's workers cannot start here")
'''


def test_a_crash_looping_child_is_reported_and_the_others_keep_running(jobqd, ledger, tmp_path):
    (tmp_path / "crashing.py").write_text(CRASHING_MODULE)
    config = base_config(ledger)
    config["imports"] = ["helpers", "crashing"]
    config["queues"] = {
        "good": {"processes": 1, "concurrency": 2},
        "bad": {"processes": 1, "concurrency": 2},
    }
    daemon = jobqd(config, env={"CRASH_IN": "worker bad#"})
    daemon.booted("worker good#0")
    line = daemon.wait_log(
        lambda r: "is crash-looping" in r.get("message", "") and r.get("child") == "worker bad#0"
    )
    assert line["level"] == "ERROR" and line["queue"] == "bad"
    ready = daemon.wait_log(lambda r: r.get("message", "").startswith("ready"))
    assert "crash loop: worker bad#0" in ready["message"]

    ids = enqueue(ledger, "test.record", queue="good", count=5)
    wait_for(lambda: states(ledger, ids) == {"succeeded": 5}, what="the good queue's jobs")
    assert daemon.proc.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0


def test_when_no_worker_can_boot_the_daemon_exits_with_the_boot_failure_code(jobqd, ledger):
    config = base_config(ledger)
    config["imports"] = ["helpers", "no_such_module_anywhere"]
    daemon = jobqd(config)
    assert daemon.wait(20) == EXIT_BOOT_FAILED
    failed = daemon.find_log(lambda r: r.get("message", "").startswith("worker default#0 failed"))
    assert "cannot import 'no_such_module_anywhere'" in failed["message"]
    assert daemon.find_log(lambda r: r.get("message", "").startswith("no worker process could"))


def test_no_migrate_leaves_the_database_alone(empty_dsn, tmp_path):
    daemon = Daemon(tmp_path, empty_dsn, daemon_env(empty_dsn, tmp_path))
    daemon.write_config(base_config(empty_dsn))
    daemon.start("--no-migrate")
    try:
        # Without the schema no worker can register: the daemon gives up with the boot code.
        assert daemon.wait(20) == EXIT_BOOT_FAILED
    finally:
        daemon.stop()
    assert daemon.find_log(lambda r: r.get("message", "").startswith("not applying migrations"))
    assert scalar(empty_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'jobqd'") == 0

"""Command tasks never outlive their job (issue 11, item 3): the daemon as a process runs
programs declared under `tasks:`; each program writes its pid to a file, and the test checks
with os.kill(pid, 0) and /proc that none is left once its job is over, whatever ended it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from e2e_daemon import alive, base_config, proc_stat
from helpers import wait_for

from jobqd.client import Client

# $1 the directory for evidence, $2 `wait` (the program waits on a `sleep 47` child in its
# group) or `exec` (the program becomes `sleep 47`), $3 `ignore` (SIGTERM is ignored, by the
# child too: only SIGKILL ends it) or `obey`. Before starting, it notes any earlier attempt's
# program of the same job that is still alive (a zombie is not): a retry must never run
# beside it.
PROGRAM = """\
d=$1; key=$JOBQD_JOB_ID-$JOBQD_ATTEMPT
note() { echo "$2" > "$d/$1-$key.tmp"; mv "$d/$1-$key.tmp" "$d/$1-$key"; }
[ "$3" = ignore ] && trap '' TERM
for f in "$d"/pid-$JOBQD_JOB_ID-* "$d"/child-$JOBQD_JOB_ID-*; do
  [ -e "$f" ] || continue
  state=$(sed 's/.*) //' "/proc/$(cat "$f")/stat" 2>/dev/null | cut -c1)
  [ -n "$state" ] && [ "$state" != Z ] && echo "$key beside $f ($state)" >> "$d/overlap"
done
if [ "$2" = exec ]; then note pid $$; exec sleep 47; fi
sleep 47 &
note child $!
note pid $$
wait
"""

# Reads the job from stdin, keeps what it saw, exits with args.codes[attempt - 1].
REPORTER = """\
import json, os, sys
job = json.load(sys.stdin)
seen = {k: v for k, v in os.environ.items() if k.startswith("JOBQD_") and "TEST" not in k}
path = os.path.join(job["args"]["dir"], f"seen-{job['id']}-{job['attempt']}.json")
with open(path, "w") as f:
    json.dump({"stdin": job, "env": seen}, f)
print("out", job["attempt"])
print("first line", file=sys.stderr)
print("what went wrong", file=sys.stderr)
codes = job["args"]["codes"]
sys.exit(codes[min(job["attempt"], len(codes)) - 1])
"""

JOBQCTL = str(Path(sys.executable).with_name("jobqctl"))


def command_config(dsn: str, tmp_path: Path, **queue: Any) -> dict[str, Any]:
    (tmp_path / "program.sh").write_text(PROGRAM)
    (tmp_path / "reporter.py").write_text(REPORTER)
    config = base_config(dsn)
    config["queues"]["default"] = {
        "processes": 1,
        "concurrency": 2,
        "backoff": {"kind": "fixed", "base": "100ms", "jitter": 0},
        **queue,
    }
    config["tasks"] = {
        "prog": {"command": ["sh", str(tmp_path / "program.sh"), "{dir}", "{mode}", "{term}"]},
        "report": {"command": [sys.executable, str(tmp_path / "reporter.py")]},
    }
    return config


def enqueue(dsn: str, task: str, args: dict[str, Any], **options: Any) -> int:
    with Client(dsn) as client:
        return client.enqueue(task, args, **options)


def job_row(dsn: str, job_id: int) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT state, attempt, extract(epoch FROM started_at)::float8 AS started,"
            " last_error, result FROM jobqd.jobs WHERE id = %s",
            (job_id,),
        )
        names = [c.name for c in cur.description]
        return dict(zip(names, cur.fetchone(), strict=True))


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def pids(tmp_path: Path, job_id: int, attempt: int, *, child: bool = True) -> list[int]:
    """The program's pid (and its child's, in `wait` mode) once it wrote them."""
    names = ["pid", "child"] if child else ["pid"]
    return wait_for(
        lambda: (
            found
            if all(found := [read_pid(tmp_path / f"{n}-{job_id}-{attempt}") for n in names])
            else None
        ),
        timeout=20,
        what=f"job {job_id} attempt {attempt}'s program to start",
    )


def running(pid: int) -> bool:
    """Alive by os.kill(pid, 0) and not a zombie by /proc; a process re-parented to pid 1
    counts as running too."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return alive(pid)


def left_behind(found: list[int]) -> list[str]:
    return [f"{pid} (parent {proc_stat(pid)[1]})" for pid in found if running(pid)]


def wait_gone(found: list[int], seconds: float, what: str) -> float:
    """Wait until none of `found` runs; returns the wall-clock time it was seen so."""
    wait_for(lambda: not left_behind(found), timeout=seconds, interval=0.02, what=what)
    return time.time()


def no_overlap(tmp_path: Path) -> None:
    overlap = tmp_path / "overlap"
    assert not overlap.exists(), f"a retry ran beside its earlier attempt: {overlap.read_text()}"


def test_timeout_ends_the_program_and_its_group_before_the_worker_recycles(jobqd, ledger, tmp_path):
    """The issue's case: 1 s timeout, 1 s grace, a `sleep 47` that ignores SIGTERM. It is
    killed at the hard limit, the worker recycles, nothing is left with parent pid 1, and the
    retry (one more attempt) does not run beside it, on either worker."""
    config = command_config(ledger, tmp_path, processes=2, timeout="1s", grace="1s", max_attempts=2)
    daemon = jobqd(config)
    daemon.booted("worker default#0")
    daemon.booted("worker default#1")
    job_id = enqueue(ledger, "prog", {"dir": str(tmp_path), "mode": "wait", "term": "ignore"})
    first = pids(tmp_path, job_id, 1)
    started = job_row(ledger, job_id)["started"]
    took = wait_gone(first, 10, "the timed-out program and its child to be gone") - started
    print(f"ignoring SIGTERM, the program lived {took:.2f}s after its claim")
    assert took <= 1 + 1 + 1.5, f"program lived {took:.2f}s after its claim (timeout 1s, grace 1s)"

    recycled = daemon.wait_log(
        lambda r: "recycling worker process: hard timeout" in r.get("message", ""),
        what="the worker to recycle on the hard timeout",
    )
    wait_for(lambda: not alive(recycled["pid"]), timeout=15, what="the recycled worker to exit")
    assert not left_behind(first)

    second = pids(tmp_path, job_id, 2)
    wait_for(lambda: job_row(ledger, job_id)["state"] == "dead", timeout=20, what="job dead")
    wait_gone(second, 10, "the second attempt's program to be gone")
    no_overlap(tmp_path)
    assert "timeout" in job_row(ledger, job_id)["last_error"].lower()


def test_a_program_that_obeys_sigterm_ends_at_the_soft_timeout_without_a_recycle(
    jobqd, ledger, tmp_path
):
    config = command_config(ledger, tmp_path, timeout="1s", grace="5s", max_attempts=2)
    daemon = jobqd(config)
    worker = daemon.booted("worker default#0")
    job_id = enqueue(ledger, "prog", {"dir": str(tmp_path), "mode": "wait", "term": "obey"})
    first = pids(tmp_path, job_id, 1)
    started = job_row(ledger, job_id)["started"]
    took = wait_gone(first, 10, "the program to stop at its soft timeout") - started
    print(f"obeying SIGTERM, the program lived {took:.2f}s after its claim")
    assert took <= 1 + 1.5, f"program lived {took:.2f}s after its claim (timeout 1s)"
    second = pids(tmp_path, job_id, 2)
    wait_for(lambda: job_row(ledger, job_id)["state"] == "dead", timeout=20, what="job dead")
    wait_gone(second, 10, "the second attempt's program to be gone")
    no_overlap(tmp_path)
    assert alive(worker) and daemon.child("worker default#0") == worker, "no recycle needed"
    assert "soft timeout" in job_row(ledger, job_id)["last_error"]


def test_cancel_stops_the_program_group_sigkill_after_the_grace(jobqd, ledger, tmp_path):
    config = command_config(ledger, tmp_path, lease="3s", grace="1s")
    daemon = jobqd(config)
    worker = daemon.booted("worker default#0")
    job_id = enqueue(ledger, "prog", {"dir": str(tmp_path), "mode": "wait", "term": "ignore"})
    found = pids(tmp_path, job_id, 1)
    cancelled = subprocess.run(
        [JOBQCTL, "--dsn", ledger, "cancel", str(job_id)], capture_output=True, text=True
    )
    assert cancelled.returncode == 0, cancelled.stderr
    began = time.time()
    # The worker hears of the cancel at its next heartbeat (lease / 3 = 1 s); then TERM,
    # ignored, and KILL 1 s later.
    took = wait_gone(found, 10, "the cancelled job's program to be gone") - began
    print(f"ignoring SIGTERM, the program was gone {took:.2f}s after the cancel")
    assert took <= 1 + 1 + 1.5, f"took {took:.2f}s after the cancel"
    assert job_row(ledger, job_id)["state"] == "cancelled"
    assert alive(worker) and daemon.child("worker default#0") == worker
    after = enqueue(ledger, "report", {"dir": str(tmp_path), "codes": [0]})
    wait_for(lambda: job_row(ledger, after)["state"] == "succeeded", what="the slot to serve again")


def _two_programs(ledger: str, tmp_path: Path) -> tuple[list[int], list[int]]:
    """One program that ignores SIGTERM and has a child, one that obeys and is `sleep`."""
    a = enqueue(ledger, "prog", {"dir": str(tmp_path), "mode": "wait", "term": "ignore"})
    b = enqueue(ledger, "prog", {"dir": str(tmp_path), "mode": "exec", "term": "obey"})
    return [a, b], [*pids(tmp_path, a, 1), *pids(tmp_path, b, 1, child=False)]


def test_fast_stop_leaves_no_program_and_releases_the_jobs(jobqd, ledger, tmp_path):
    config = command_config(ledger, tmp_path, grace="30s")
    daemon = jobqd(config)
    daemon.booted("worker default#0")
    ids, found = _two_programs(ledger, tmp_path)
    began = time.monotonic()
    daemon.signal(signal.SIGQUIT)
    daemon.wait(15)
    print(f"fast stop took {time.monotonic() - began:.2f}s")
    wait_gone(found, 2, "no program after a fast stop (SIGKILL lands asynchronously)")
    assert [job_row(ledger, i)["state"] for i in ids] == ["queued", "queued"]


def test_drain_past_shutdown_timeout_leaves_no_program(jobqd, ledger, tmp_path):
    config = command_config(ledger, tmp_path, grace="30s")
    config["shutdown_timeout"] = "1s"
    daemon = jobqd(config)
    daemon.booted("worker default#0")
    ids, found = _two_programs(ledger, tmp_path)
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    print(f"drain with shutdown_timeout 1s took {time.monotonic() - began:.2f}s")
    wait_gone(found, 2, "no program after the drain (SIGKILL lands asynchronously)")
    assert [job_row(ledger, i)["state"] for i in ids] == ["queued", "queued"]


def test_a_sigkilled_worker_takes_its_program_along(jobqd, ledger, tmp_path):
    config = command_config(ledger, tmp_path, lease="3s", grace="1s")
    daemon = jobqd(config)
    worker = daemon.booted("worker default#0")
    job_id = enqueue(ledger, "prog", {"dir": str(tmp_path), "mode": "exec", "term": "ignore"})
    found = pids(tmp_path, job_id, 1, child=False)
    os.kill(worker, signal.SIGKILL)
    wait_gone(found, 5, "the program of the killed worker to be gone")
    # The replacement releases the dead worker's job, which runs again: not beside the first.
    daemon.booted("worker default#0", other_than=worker)
    second = pids(tmp_path, job_id, 2, child=False)
    no_overlap(tmp_path)
    with psycopg.connect(ledger, autocommit=True) as conn:
        conn.execute("SELECT jobqd.cancel(%s)", (job_id,))
    wait_gone(second, 10, "the cancelled retry's program to be gone")


def test_programs_get_the_job_on_stdin_and_in_env_and_exit_codes_decide(jobqd, ledger, tmp_path):
    config = command_config(ledger, tmp_path)
    daemon = jobqd(config)
    daemon.booted("worker default#0")

    def job(codes: list[int], **options: Any) -> int:
        return enqueue(
            ledger, "report", {"dir": str(tmp_path), "codes": codes, "name": "Renée"}, **options
        )

    ok, later, discard, failing = job([0]), job([75, 0]), job([65]), job([3], max_attempts=2)
    for job_id in (ok, later, discard, failing):
        wait_for(
            lambda j=job_id: job_row(ledger, j)["state"] in ("succeeded", "dead"),
            what=f"job {job_id} to end",
        )
    rows = {j: job_row(ledger, j) for j in (ok, later, discard, failing)}
    assert (rows[ok]["state"], rows[ok]["attempt"]) == ("succeeded", 1)
    assert rows[ok]["result"]["stdout"] == "out 1\n"
    assert (rows[later]["state"], rows[later]["attempt"]) == ("succeeded", 2)
    assert (rows[discard]["state"], rows[discard]["attempt"]) == ("dead", 1)
    assert "status 65 (discard): what went wrong" in rows[discard]["last_error"]
    assert (rows[failing]["state"], rows[failing]["attempt"]) == ("dead", 2)
    assert "exited with status 3: what went wrong" in rows[failing]["last_error"]
    with Client(ledger) as client:
        record = client.get(failing).errors[-1]
    assert "stderr: first line\nwhat went wrong" in record["traceback"], "the tails are kept"

    seen = json.loads((tmp_path / f"seen-{later}-2.json").read_text())
    assert seen["stdin"] == {
        "id": later,
        "queue": "default",
        "task": "report",
        "attempt": 2,
        "max_attempts": 20,
        "args": {"dir": str(tmp_path), "codes": [75, 0], "name": "Renée"},
    }
    assert {k: v for k, v in seen["env"].items() if k != "JOBQD_DATABASE_URL"} == {
        "JOBQD_JOB_ID": str(later),
        "JOBQD_ATTEMPT": "2",
        "JOBQD_MAX_ATTEMPTS": "20",
        "JOBQD_QUEUE": "default",
        "JOBQD_TASK": "report",
    }

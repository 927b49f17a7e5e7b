"""Rolling code upgrades: `jobqctl roll` (SIGUSR2 to this host's masters) replaces every worker
while a producer keeps enqueueing; no job is dropped, run twice or released, every queue has
a claiming worker at every moment, and the jobs after the roll run the new task code. A
replacement that cannot boot stops the roll and leaves the old workers serving."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from e2e_daemon import alive, base_config, children_of, enqueue, states, title
from faults import free_port
from helpers import wait_for

TASKS = '''\
"""Test task code as an application deploys it; VERSION is what each job records."""
import os
import threading
import time

import psycopg

from jobqd import task

VERSION = {version!r}
_local = threading.local()
{extra}

@task("roll.work")
def work(job):
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(os.environ["JOBQD_TEST_LEDGER_DSN"], autocommit=True)
    conn.execute(
        "INSERT INTO public.ledger (job_id, attempt, pid, task) VALUES (%s, %s, %s, %s)",
        (job.id, job.attempt, os.getpid(), VERSION),
    )
    time.sleep(job.args.get("seconds", 0))
'''

FAILS_IN_WORKER_B = """
# Import-time code that fails only where the workers of queue b run (say, a service only they
# reach): `jobqd --check`, which the roll runs first, imports this module without failing.
from setproctitle import getproctitle

if getproctitle().startswith("jobqd: worker b#"):
    raise RuntimeError("cannot reach the flags service")
"""

SERVING = re.compile(r"^jobqd: worker (\w+)#\d+ \d+/\d+$")
"""A worker that has booted and claims: its title shows its slots and not ` draining`."""


def deploy(directory: Path, version: str, extra: str = "") -> None:
    """Write the task module the way a deploy does: a new file whose mtime moves on."""
    path = directory / "rolltasks.py"
    before = path.stat().st_mtime if path.exists() else 0.0
    path.write_text(TASKS.format(version=version, extra=extra))
    stamp = max(time.time(), before) + 1  # whatever the clock's resolution, bytecode is redone
    os.utime(path, (stamp, stamp))


def config(dsn: str, **queues: int) -> dict[str, Any]:
    made = base_config(dsn)
    made["imports"] = ["rolltasks"]
    made["queues"] = {q: {"processes": n, "concurrency": 4} for q, n in queues.items()}
    return made


def jobqctl(dsn: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobqd.cli.ctl", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "JOBQD_DATABASE_URL"},
    )


class Sampler(threading.Thread):
    """Every 20 ms, how many workers of each queue claim (by their titles); a gap is two
    samples in a row with none for a queue (one sample may read two titles mid-change)."""

    def __init__(self, master: int, queues: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        self.master, self.queues = master, queues
        self.samples = 0
        self.gaps: list[str] = []
        self.pids: dict[str, set[int]] = {q: set() for q in queues}
        self._done = threading.Event()

    def run(self) -> None:
        empty_before: set[str] = set()
        while not self._done.wait(0.02):
            serving = {q: 0 for q in self.queues}
            for pid, text in children_of(self.master).items():
                if found := SERVING.match(text):
                    serving[found[1]] += 1
                    self.pids[found[1]].add(pid)
            empty = {q for q, n in serving.items() if n == 0}
            self.gaps += [f"sample {self.samples}: {q}" for q in empty & empty_before]
            empty_before = empty
            self.samples += 1

    def stop(self) -> None:
        self._done.set()
        self.join()


class Producer(threading.Thread):
    """Enqueues a job into each queue every 30 ms, as an application under load would."""

    def __init__(self, dsn: str, queues: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.queues = dsn, queues
        self.ids: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._done.wait(0.03):
                for queue in self.queues:
                    row = conn.execute(
                        "SELECT jobqd.enqueue(%s, 'roll.work', '{\"seconds\": 0.3}')", (queue,)
                    ).fetchone()
                    self.ids.append(row[0])

    def stop(self) -> list[int]:
        self._done.set()
        self.join()
        return self.ids


def runs_of(dsn: str, ids: list[int]) -> list[tuple[int, int, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT job_id, attempt, task FROM public.ledger WHERE job_id = ANY(%s)", (ids,)
        ).fetchall()


def attempts(dsn: str, ids: list[int]) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT DISTINCT attempt FROM jobqd.jobs WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {row[0] for row in rows}


def worker_pids(daemon: Any) -> dict[int, str]:
    return {p: t for p, t in daemon.children().items() if t.startswith("jobqd: worker")}


def test_a_roll_under_load_drops_no_job_keeps_every_queue_claiming_and_runs_the_new_code(
    jobqd, ledger, tmp_path
):
    dsn, directory = ledger, tmp_path
    deploy(directory, "v1")
    daemon = jobqd(config(dsn, a=2, b=1))
    for name in ("worker a#0", "worker a#1", "worker b#0"):
        daemon.booted(name)
    old = set(worker_pids(daemon))
    sampler, producer = Sampler(daemon.pid, ("a", "b")), Producer(dsn, ("a", "b"))
    sampler.start()
    producer.start()
    wait_for(lambda: {t for _, _, t in runs_of(dsn, producer.ids)} == {"v1"}, what="v1 jobs")

    deploy(directory, "v2")
    rolled = jobqctl(dsn, "roll", "--json")
    assert rolled.returncode == 0, rolled.stderr
    (outcome,) = json.loads(rolled.stdout)["masters"]
    assert outcome["master_pid"] == daemon.pid and outcome["state"] == "done"
    assert outcome["replaced"] == outcome["total"] == 3
    assert "rolling" in rolled.stderr  # progress while it ran

    during = producer.stop()
    after = enqueue(dsn, "roll.work", queue="a", count=20)
    after += enqueue(dsn, "roll.work", queue="b", count=10)
    everything = during + after
    wait_for(
        lambda: states(dsn, everything) == {"succeeded": len(everything)},
        timeout=60,
        what="every job to succeed",
    )
    sampler.stop()

    runs = runs_of(dsn, everything)
    assert sorted(job for job, _, _ in runs) == sorted(everything)  # each ran exactly once
    assert attempts(dsn, everything) == {1}  # no lease lost: nothing released or reaped
    assert {version for job, _, version in runs if job in set(after)} == {"v2"}
    assert {version for _, _, version in runs} == {"v1", "v2"}
    assert sampler.samples > 50 and sampler.gaps == [], sampler.gaps
    assert all(len(pids) >= 2 for pids in sampler.pids.values())  # old and new seen serving
    new = set(worker_pids(daemon))
    assert len(new) == 3 and not new & old and not any(alive(p) for p in old)
    assert not daemon.find_log(lambda r: "released" in r.get("message", ""))
    assert title(daemon.pid) == "jobqd: master roll 1 done 3/3"
    done = daemon.wait_log(lambda r: r.get("message", "").startswith("roll 1 done"))
    assert done["message"].startswith("roll 1 done: 3 worker(s) replaced in ")

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0


def test_a_replacement_that_cannot_boot_stops_the_roll_and_the_old_workers_keep_serving(
    jobqd, ledger, tmp_path
):
    dsn, directory = ledger, tmp_path
    deploy(directory, "v1")
    settings = config(dsn, a=1, b=1)
    settings["http"] = {"listen": f"127.0.0.1:{free_port()}"}
    daemon = jobqd(settings)
    a0, b0 = daemon.booted("worker a#0"), daemon.booted("worker b#0")
    daemon.booted("http")

    deploy(directory, "v2", FAILS_IN_WORKER_B)
    rolled = jobqctl(dsn, "roll")
    assert rolled.returncode == 1, rolled.stdout + rolled.stderr
    assert f"roll 1 of master {daemon.pid} on " in rolled.stderr
    assert "failed at worker b#0 (1/2 workers replaced)" in rolled.stderr
    assert "journalctl -u jobqd" in rolled.stderr

    assert alive(b0) and not alive(a0)  # a#0 was replaced before b#0's replacement failed
    workers = worker_pids(daemon)
    assert len(workers) == 2 and b0 in workers
    assert title(daemon.pid) == "jobqd: master roll 1 failed 1/2 worker b#0"
    stopped = daemon.wait_log(lambda r: r.get("message", "").startswith("roll 1 stopped"))
    assert stopped["level"] == "ERROR" and "cannot reach the flags service" in daemon.tail(200)
    assert "exited before it booted" in stopped["message"]

    status = wait_for(
        # the generations show first; the failed roll follows with the http child's health write
        lambda: (lambda out: out if "roll 1 stopped" in out else None)(
            jobqctl(dsn, "status").stdout
        ),
        what="jobqctl status to show the stopped roll",
    )
    assert f"master {daemon.pid}: roll 1 stopped: the replacement for worker b#0 exited" in status
    assert "1 worker(s) still run earlier code" in status

    ids = enqueue(dsn, "roll.work", queue="a", count=5) + enqueue(
        dsn, "roll.work", queue="b", count=5
    )
    wait_for(lambda: states(dsn, ids) == {"succeeded": 10}, what="jobs on both queues")
    versions = {job: version for job, _, version in runs_of(dsn, ids)}
    assert {versions[i] for i in ids[:5]} == {"v2"} and {versions[i] for i in ids[5:]} == {"v1"}
    assert worker_pids(daemon) == workers  # the failed replacement was not restarted
    started = [r for r in daemon.logs() if r.get("message") == "started worker b#0"]
    assert len(started) == 2  # the first b#0 and its one failed replacement

    deploy(directory, "v3")  # fixed: the next roll replaces every worker still on old code
    again = jobqctl(dsn, "roll", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["masters"][0]["replaced"] == 2
    assert title(daemon.pid) == "jobqd: master roll 2 done 2/2"
    assert not alive(b0)

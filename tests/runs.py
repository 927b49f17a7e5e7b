"""A ledger of job runs written by the task itself, and the checks made against it.

The task `faults.run` sleeps `args.seconds` in small steps, stopping early when the worker
flags the job cancelled (a lost lease), and records each run: job id, attempt, pid, start and
end (wall clock, the same clock as the database's on this one machine), the outcome (`done`,
or `gave up: REASON`) and whether its lease was still valid at the end, by the database.

The ledger is a file per process (JSON lines, appended with one write each, so a SIGKILL
loses nothing written) in `$JOBQD_TEST_RUNS_DIR`, not a table: it must not share the faults
it observes, and a task that waited for the database would hide them (a worker whose slots
all wait never claims, so never meets the outage). The lease check at the end is one quick
try against `$JOBQD_TEST_LEDGER_DSN` (the server itself, never a proxy); `null` if it fails.

The daemon imports this module (`imports: [runs]`); the tests and the soak call `audit`.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from helpers import LEDGER_DSN_ENV

from jobqd.tasks import Job, task

RUNS_DIR_ENV = "JOBQD_TEST_RUNS_DIR"
_LEASE_OK = """SELECT EXISTS (SELECT 1 FROM jobqd.jobs WHERE id = %s AND attempt = %s
                AND state = 'running' AND lease_expires_at > clock_timestamp())"""

_local = threading.local()
_numbers = itertools.count()
_files: dict[int, int] = {}  # pid -> fd, so a forked child opens a file of its own


def _append(event: dict[str, Any]) -> None:
    pid = os.getpid()
    fd = _files.get(pid)
    if fd is None:
        path = Path(os.environ[RUNS_DIR_ENV]) / f"runs-{pid}.jsonl"
        fd = _files[pid] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (json.dumps(event) + "\n").encode())


def _lease_ok(job: Job) -> bool | None:
    """Whether the job's lease is valid now; None when the server cannot say. A kept session
    that broke (a restart or a terminate since the last run) gets one fresh try."""
    for _ in range(2):
        conn = getattr(_local, "conn", None)
        fresh = conn is None or conn.closed
        try:
            if fresh:
                conn = _local.conn = psycopg.connect(
                    os.environ[LEDGER_DSN_ENV],
                    autocommit=True,
                    connect_timeout=1,
                    options="-c statement_timeout=1000",
                )
            return bool(conn.execute(_LEASE_OK, (job.id, job.attempt)).fetchone()[0])
        except psycopg.Error:
            if conn is not None:
                conn.close()
            if fresh:
                return None
    return None


@task("faults.run", max_attempts=50)
def run(job: Job) -> None:
    key = f"{os.getpid()}-{next(_numbers)}"
    _append(
        {"run": key, "job": job.id, "attempt": job.attempt, "pid": os.getpid(), "t": time.time()}
    )
    outcome = "done"
    try:
        deadline = time.monotonic() + float(job.args.get("seconds", 0.1))
        while (left := deadline - time.monotonic()) > 0:
            if job.cancelled:
                outcome = f"gave up: {job.cancel_reason}"
                break
            time.sleep(min(left, 0.01))
    finally:
        _append({"run": key, "end": time.time(), "outcome": outcome, "lease_ok": _lease_ok(job)})
    job.check()


@dataclass
class Run:
    job: int
    attempt: int
    pid: int
    start: float
    end: float | None = None
    outcome: str | None = None
    lease_ok: bool | None = None


def read_runs(directory: Path) -> list[Run]:
    """Every run recorded under `directory`, in start order."""
    runs: dict[str, Run] = {}
    for path in sorted(directory.glob("runs-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if "job" in event:
                runs[event["run"]] = Run(event["job"], event["attempt"], event["pid"], event["t"])
            elif event["run"] in runs:
                found = runs[event["run"]]
                found.end, found.outcome = event["end"], event["outcome"]
                found.lease_ok = event["lease_ok"]
    return sorted(runs.values(), key=lambda r: r.start)


def overlaps(runs: list[Run], *, valid_only: bool) -> list[tuple[Run, Run]]:
    """Pairs of runs of one job where the later started before the earlier had ended. With
    `valid_only`, only those whose earlier run still held a valid lease when it ended (so
    while the later one ran beside it). Runs without an end (killed) are left out."""
    by_job: dict[int, list[Run]] = {}
    for r in runs:
        by_job.setdefault(r.job, []).append(r)
    found = []
    for job_runs in by_job.values():
        for i, earlier in enumerate(job_runs):
            if earlier.end is None or (valid_only and earlier.lease_ok is not True):
                continue
            found.extend(
                (earlier, later) for later in job_runs[i + 1 :] if later.start < earlier.end
            )
    return found


@dataclass(frozen=True)
class Fault:
    """A fault as the audit weighs it: a run whose outcome came within [start, end] (epoch
    seconds) in a process it hit may have lost that outcome to it. It hit the process `pid`
    only, or else every process of `daemon`, or else (both None) every process."""

    kind: str
    start: float
    end: float
    daemon: str | None = None
    pid: int | None = None

    def hit(self, run: Run, owner: dict[int, str]) -> bool:
        if run.end is None or not self.start <= run.end <= self.end:
            return False
        if self.pid is not None:
            return run.pid == self.pid
        return self.daemon is None or owner.get(run.pid) == self.daemon


def cause(run: Run, faults: list[Fault], owner: dict[int, str]) -> str:
    """Why a job whose `run` completed ran again. `lease lost before the end`: its lease was
    gone when the task finished (frozen or cut off past it), so the fence rightly dropped the
    outcome; else the first other fault that hit its process as it finished; a master kill
    only when nothing else did; `unexplained` when nothing did."""
    if run.lease_ok is False:
        return "lease lost before the end"
    hits = [f.kind for f in faults if f.hit(run, owner)]
    others = [kind for kind in hits if kind != "kill_master"]
    return others[0] if others else hits[0] if hits else "unexplained"


def audit(
    dsn: str,
    ids: list[int],
    runs_dir: Path,
    *,
    faults: Sequence[Fault] = (),
    owner: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The checks over the jobs table and the ledger for the jobs `ids`.

    A job whose effect happened twice (two runs ended `done`) is put down to a cause (see
    `cause`) from `faults` and `owner` (worker pid -> daemon name): `doubled_after_master_kill`
    counts those a master kill alone explains, `doubled_unexplained` those no fault does.
    """
    owner = owner or {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, state, attempt FROM jobqd.jobs WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    jobs = {job: (state, attempt) for job, state, attempt in rows}
    states: dict[str, int] = {}
    for state, _ in jobs.values():
        states[state] = states.get(state, 0) + 1
    wanted = set(ids)
    runs = [r for r in read_runs(runs_dir) if r.job in wanted]
    # A release (fast stop, drain deadline, a dead worker's jobs) gives a job back without
    # spending its attempt, so the next run reuses the number: explained when the earlier run
    # with that number never completed. A reuse after a completed run, or a run numbered past
    # the job's attempt count, is not.
    earlier: dict[tuple[int, int], Run] = {}
    unexplained: list[Run] = []
    reused = 0
    done: dict[int, list[Run]] = {}
    for r in runs:
        before = earlier.get((r.job, r.attempt))
        if before is not None:
            reused += 1
        if (before is not None and before.outcome == "done") or r.attempt > jobs.get(
            r.job, ("", 0)
        )[1]:
            unexplained.append(r)
        earlier[(r.job, r.attempt)] = r
        if r.outcome == "done":
            done.setdefault(r.job, []).append(r)
    doubled = {job: cause(rs[0], list(faults), owner) for job, rs in done.items() if len(rs) > 1}
    # The first soak's measure, kept for comparison: any double whose first completed run
    # ended in a master kill's window, whichever daemon and whatever else hit it.
    kills = [f for f in faults if f.kind == "kill_master"]
    near_kill = sum(
        1 for job in doubled if any(k.start <= (done[job][0].end or 0) <= k.end for k in kills)
    )
    causes: dict[str, int] = {}
    for why in doubled.values():
        causes[why] = causes.get(why, 0) + 1
    return {
        "jobs": len(ids),
        "states": states,
        "lost": len(wanted - set(jobs)),
        "left_running": states.get("running", 0),
        "left_queued": states.get("queued", 0),
        "runs": len(runs),
        "runs_gave_up": sum(1 for r in runs if (r.outcome or "").startswith("gave up")),
        "runs_unended": sum(1 for r in runs if r.end is None),
        "overlaps": len(overlaps(runs, valid_only=False)),
        "overlaps_valid_lease": len(overlaps(runs, valid_only=True)),
        "attempts_reused_after_release": reused,
        "unexplained_runs": len(unexplained),
        "unexplained_examples": [vars(r) for r in unexplained[:10]],
        "doubled": len(doubled),
        "doubled_by_cause": causes,
        "doubled_examples": {
            why: [job for job, c in sorted(doubled.items()) if c == why][:10] for why in causes
        },
        "doubled_after_master_kill": causes.get("kill_master", 0),
        "doubled_near_master_kill": near_kill,
        "doubled_unexplained": causes.get("unexplained", 0),
        "succeeded_without_effect": sum(
            1 for job, (state, _) in jobs.items() if state == "succeeded" and job not in done
        ),
    }

"""A command task's program outside the worker (as jobqd.testing runs it): its own timeout
stops its whole group, end_programs stops whatever is running, a missing program says so."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from e2e_daemon import alive
from helpers import wait_for

from jobqd.tasks import CommandFailed, Job, JobCancelled, command_task, end_programs

# Ignores SIGTERM, starts a child that does too, notes both pids, waits.
STUBBORN = (
    "trap '' TERM; sleep 47 & echo $! > {dir}/child; echo $$ > {dir}/pid.tmp;"
    " mv {dir}/pid.tmp {dir}/pid; wait"
)


def settings(command: tuple[str, ...], timeout: float | None = None) -> Any:
    return SimpleNamespace(
        command=command, env={}, cwd=None, timeout=timeout, queue="default", max_attempts=1
    )


def job(args: dict[str, Any]) -> Job:
    return Job(id=7, queue="default", task="cmd", args=args, attempt=1, max_attempts=1)


def pids(tmp_path: Path) -> list[int]:
    wait_for(lambda: (tmp_path / "pid").exists(), timeout=10, what="the program to start")
    return [int((tmp_path / name).read_text()) for name in ("pid", "child")]


def test_own_timeout_terms_then_kills_the_group_after_the_grace(tmp_path):
    spec = command_task("cmd", settings(("sh", "-c", STUBBORN), timeout=0.5), grace=0.5)
    began = time.monotonic()
    with pytest.raises(JobCancelled, match="soft timeout: sh was stopped"):
        spec.fn(job({"dir": str(tmp_path)}))
    took = time.monotonic() - began
    assert 0.5 + 0.5 <= took < 0.5 + 0.5 + 1.0, f"took {took:.2f}s"
    found = pids(tmp_path)
    wait_for(lambda: not [pid for pid in found if alive(pid)], timeout=2, what="no program")


def test_end_programs_stops_a_running_program_from_another_thread(tmp_path):
    spec = command_task("cmd", settings(("sh", "-c", STUBBORN)), grace=30)
    the_job = job({"dir": str(tmp_path)})
    raised: list[BaseException] = []

    def run() -> None:
        try:
            spec.fn(the_job)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    found = pids(tmp_path)
    the_job.cancel("worker shutting down")  # what the worker's shutdown does first
    began = time.monotonic()
    assert end_programs(0.3) == 1
    assert time.monotonic() - began < 0.3 + 1.0
    thread.join(5)
    # SIGKILL is delivered asynchronously: the child may take a moment to be gone.
    wait_for(lambda: not [pid for pid in found if alive(pid)], timeout=2, what="no program")
    assert isinstance(raised[0], JobCancelled)
    assert end_programs(0.3) == 0


def test_a_missing_program_is_a_failure_that_names_it(tmp_path):
    spec = command_task("cmd", settings((str(tmp_path / "nothing-here"),)), grace=1)
    with pytest.raises(CommandFailed, match=r"exited with status 127: cannot run .*nothing-here"):
        spec.fn(job({}))


def test_a_program_gets_back_the_signals_its_worker_ignores(tmp_path):
    """A worker ignores INT, HUP and USR2 (its master coordinates them); its programs do not."""
    ignored = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
    before = {signum: signal.signal(signum, signal.SIG_IGN) for signum in ignored}
    try:
        spec = command_task(
            "cmd",
            settings(("sh", "-c", f"grep SigIgn /proc/self/status > {tmp_path}/mask")),
            grace=1,
        )
        spec.fn(job({}))
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    mask = int((tmp_path / "mask").read_text().split()[1], 16)
    assert [s.name for s in ignored if mask & (1 << (s - 1))] == []

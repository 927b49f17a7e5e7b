"""`jobqd --health` (the container HEALTHCHECK) against a real master: healthy while it turns
its loop, unhealthy when it is frozen, stopped or killed, whatever its config says about
http.listen (this one sets none). A killed master's leftover file: tests/unit/test_healthfile.py."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from e2e_daemon import Daemon
from helpers import wait_for

from jobqd.observe import healthfile


def health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobqd", "--health"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_health_follows_the_master(jobqd, tmp_path: Path) -> None:
    path = tmp_path / "health"
    daemon: Daemon = jobqd(env={healthfile.ENV: str(path)})
    wait_for(
        lambda: health(daemon.env).returncode == 0,
        timeout=60,
        interval=0.5,
        what="a healthy master",
    )
    answer = health(daemon.env)
    assert answer.stdout.startswith(f"jobqd: ok: master pid {daemon.pid}, ")

    daemon.signal(signal.SIGSTOP)  # a hung master: the file ages, the pid is still there
    try:
        wait_for(
            lambda: "silent" in healthfile.check(path, max_age=3.0).message,
            timeout=60,
            what="the frozen master reported silent",
        )
    finally:
        daemon.signal(signal.SIGCONT)
    wait_for(lambda: healthfile.check(path, max_age=3.0).healthy, timeout=60, what="healthy again")

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    stopped = health(daemon.env)
    assert stopped.returncode == 1
    assert stopped.stderr == f"jobqd: no health file {path}: jobqd is not running (or stopped)\n"

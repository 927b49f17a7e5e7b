"""The daemon as a process, for the e2e tests: start `python -m jobqd -c CONFIG` with a config
of the test's own, watch its JSON log and its process tree, send it real signals.

Every test gets its own database (`dsn`), whose config imports the `helpers` test tasks; the
ledger those tasks write to lives in the same database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml
from helpers import LEDGER_DSN_ENV, wait_for

TESTS_DIR = Path(__file__).resolve().parent.parent


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of `pid` from /proc, or None when there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def title(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def children_of(ppid: int) -> dict[int, str]:
    """Live children of `ppid`, pid -> process title (`jobqd: worker default#0 0/4`)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] == ppid and stat[0] != "Z":
                found[int(entry)] = title(int(entry))
    return found


def base_config(dsn: str) -> dict[str, Any]:
    return {
        "database": {"url": dsn},
        "imports": ["helpers"],
        "log": {"format": "json", "level": "info"},
        "shutdown_timeout": "10s",
        "queues": {"default": {"processes": 1, "concurrency": 4}},
        "reaper": {"interval": "1s"},
    }


class Daemon:
    """One `jobqd` master started as a subprocess, its log in a file."""

    def __init__(self, tmp_path: Path, dsn: str, env: dict[str, str]) -> None:
        self.dir = tmp_path
        self.dsn = dsn
        self.config_path = tmp_path / "jobqd.yaml"
        self.log_path = tmp_path / "daemon.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_children: set[int] = set()

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)

    def start(self, *args: str) -> Daemon:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobqd", "-c", str(self.config_path), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.dir,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def logs(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def find_log(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        return next((r for r in self.logs() if match(r)), None)

    def wait_log(
        self, match: Callable[[dict[str, Any]], bool], *, timeout: float = 15, what: str = ""
    ) -> dict[str, Any]:
        return wait_for(lambda: self.find_log(match), timeout=timeout, what=what or "log line")

    def children(self) -> dict[int, str]:
        found = children_of(self.pid)
        self.seen_children.update(found)
        return found

    def child(self, name: str) -> int | None:
        """The pid of the child titled `jobqd: NAME` (e.g. `worker default#0`), if any."""
        for pid, text in self.children().items():
            if text == f"jobqd: {name}" or text.startswith(f"jobqd: {name} "):
                return pid
        return None

    def booted(self, name: str, *, other_than: int | None = None) -> int:
        """Wait until the master logged that child NAME booted; returns its pid."""

        def find() -> int | None:
            for record in self.logs():
                if record.get("message") == f"{name} booted" and record.get("pid") == self.pid:
                    pid = record["child_pid"]
                    if pid != other_than and alive(pid):
                        return pid
            return None

        return wait_for(find, timeout=20, what=f"{name} to boot")

    def stop(self) -> None:
        """Teardown: TERM, then SIGKILL the master and any child it left behind."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.children()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.seen_children:
            if alive(pid) and title(pid).startswith("jobqd:"):
                os.kill(pid, signal.SIGKILL)

    def tail(self, lines: int = 80) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def daemon_env(dsn: str, *paths: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    pythonpath = [str(p) for p in (*paths, TESTS_DIR)]
    if env.get("PYTHONPATH"):
        pythonpath.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(pythonpath), **{LEDGER_DSN_ENV: dsn}, **extra)
    return env


def enqueue(
    dsn: str,
    task: str,
    args: dict[str, Any] | None = None,
    *,
    queue: str = "default",
    count: int = 1,
) -> list[int]:
    """Enqueue through the SQL API, as an application would."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT jobqd.enqueue(%s, %s, %s::jsonb) FROM generate_series(1, %s)",
            (queue, task, json.dumps(args or {}), count),
        ).fetchall()
    return [row[0] for row in rows]


def states(dsn: str, ids: list[int]) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM jobqd.jobs WHERE id = ANY(%s) GROUP BY state", (ids,)
        ).fetchall()
    return dict(rows)


def ledger_count(dsn: str, where: str = "true", params: Any = None) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM public.ledger WHERE {where}", params).fetchone()
    return row[0]


def deadline_wait(check: Callable[[], Any], seconds: float, what: str) -> float:
    """Wait for `check`; returns how long it took (fails after `seconds`)."""
    began = time.monotonic()
    wait_for(check, timeout=seconds, interval=0.02, what=what)
    return time.monotonic() - began

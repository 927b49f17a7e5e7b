"""`jobqctl roll`: roll new task code through the workers of the jobqd masters on this host.

The master holds no database connection, and a signal reaches only processes of this host, so
the command works where the code was deployed: the database says which of its processes run
on this host (their jobqd.processes rows), their parent titled `jobqd: master` is a master,
and each master in turn gets SIGUSR2; its process title then says how the roll goes
(jobqd.daemon.roll.parse_title), until it is done, failed or the deadline passed. The next
master is signalled only once the one before finished its roll. Other hosts: run it there.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobqd.daemon.roll import CHECKING, DONE, FAILED, ROLLING, TitleState, parse_title

POLL = 0.2
"""Seconds between two looks at a master's title."""

_NEXT_STEP = {
    "config": "the new configuration did not pass the check: run `jobqd --check -c FILE`, "
    "fix what it says and roll again",
    "version": "jobqd itself changed on disk: restart the daemon instead (systemctl restart jobqd)",
    "stopping": "the daemon is stopping",
}


class RollFailed(Exception):
    """A roll that did not happen or did not finish: the message says what to do next."""


@dataclass
class Outcome:
    """How one master's roll went, for the output and `--json`."""

    host: str
    master_pid: int
    roll: int
    state: str
    replaced: int
    total: int
    where: str
    seconds: float

    def document(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "master_pid": self.master_pid,
            "roll": self.roll,
            "state": self.state,
            "replaced": self.replaced,
            "total": self.total,
            "where": self.where or None,
            "seconds": round(self.seconds, 1),
        }


def _title(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def master_state(pid: int) -> TitleState | None:
    """What master `pid`'s title says of its last roll; None when it is no jobqd master."""
    return parse_title(_title(pid))


def local_masters(processes: Iterable[dict[str, Any]], host: str) -> list[int]:
    """The pids of the masters on `host` whose children registered in this database."""
    masters = set()
    for row in processes:
        if row["host"] != host or row.get("stale"):
            continue
        parent = _parent(int(row["pid"]))
        if parent is not None and master_state(parent) is not None:
            masters.add(parent)
    return sorted(masters)


def _progress(state: TitleState) -> str:
    text = f"roll {state.number} {state.state}"
    if state.state != CHECKING:
        text += f", {state.replaced}/{state.total} workers replaced"
    if state.where and state.state == ROLLING:
        text += f" (replacing {state.where})"
    return text


def roll_master(
    pid: int,
    *,
    host: str,
    timeout: float,
    note: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Signal master `pid` to roll and follow its title until the roll ended. Raises
    RollFailed when it cannot be signalled, is gone, or its roll failed or took too long."""
    before = master_state(pid)
    if before is None:
        raise RollFailed(f"process {pid} is no longer a jobqd master")
    if before.state in (CHECKING, ROLLING):
        raise RollFailed(
            f"master {pid} on {host} is already rolling ({_progress(before)}): wait for "
            "it to end (`jobqctl status`), then roll again"
        )
    try:
        os.kill(pid, signal.SIGUSR2)
    except PermissionError:
        raise RollFailed(
            f"not allowed to signal master {pid} on {host}: run jobqctl roll as the daemon's "
            "user or root (e.g. `sudo -u jobqd jobqctl roll`)"
        ) from None
    except ProcessLookupError:
        raise RollFailed(f"master {pid} on {host} exited before it could roll") from None
    began = clock()
    said = ""
    while True:
        state = master_state(pid)
        if state is None:
            raise RollFailed(f"master {pid} on {host} exited during its roll: see its log")
        if state.number > before.number:
            line = _progress(state)
            if line != said and state.state in (CHECKING, ROLLING):
                note(f"{host} master {pid}: {line}")
                said = line
            if state.state in (DONE, FAILED):
                outcome = Outcome(
                    host,
                    pid,
                    state.number,
                    state.state,
                    state.replaced,
                    state.total,
                    state.where,
                    clock() - began,
                )
                if state.state == FAILED:
                    raise RollFailed(_failure(outcome))
                return outcome
        if clock() - began >= timeout:
            where = _progress(state) if state.number > before.number else "no answer yet"
            raise RollFailed(
                f"master {pid} on {host} did not finish its roll within {timeout:g}s ({where}); "
                "it goes on: follow it in `jobqctl status` or the daemon's log"
            )
        sleep(POLL)


def _failure(outcome: Outcome) -> str:
    head = f"roll {outcome.roll} of master {outcome.master_pid} on {outcome.host} failed"
    if outcome.where in _NEXT_STEP:
        return f"{head}: {_NEXT_STEP[outcome.where]}"
    return (
        f"{head} at {outcome.where} ({outcome.replaced}/{outcome.total} workers replaced): its "
        "replacement did not boot, so it and the workers not yet replaced keep running their "
        "code; the daemon's log says why (journalctl -u jobqd): fix it and roll again"
    )


def roll_host(
    processes: Iterable[dict[str, Any]],
    *,
    timeout: float,
    note: Callable[[str], None],
    host: str | None = None,
) -> list[Outcome]:
    """Roll every master of this database on this host, one after the other; the deadline
    counts for each. Raises RollFailed at the first that does not finish its roll."""
    host = host or socket.gethostname()
    masters = local_masters(processes, host)
    if not masters:
        raise RollFailed(
            f"no jobqd master of this database runs on {host}: jobqctl roll signals the "
            "masters on its own host, so run it on each node (e.g. `ssh NODE jobqctl roll`)"
        )
    return [roll_master(pid, host=host, timeout=timeout, note=note) for pid in masters]

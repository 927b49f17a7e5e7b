"""One child lifecycle: what every child does right after fork, how it lives, how it ends.

A forked child starts as a copy of the master: the master's signal handlers and wake-up fd,
the other children's pipes, NOTIFY_SOCKET, the master's log role and metric totals. All of that
is undone by `become_child`. A child never returns into the master's code and never runs the
master's atexit handlers (the embedded Postgres handle is the master's): it always ends in
`os._exit` (`run_and_exit`).

In between, each role (worker, maintenance, http) is a `ChildProcess`: the base owns what
they all share, written once so they cannot drift: the wake pipe, the stop signals, the one
`Stopping` state, the parent check, the booted/status messages to the master and the
process's row in jobqd.processes (`ProcessRow`, also used by jobqd.testing). The master
finds each role's entry in `ROLES` and calls it with a `ChildContext`.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from jobqd.daemon.ipc import Booted, Message, Sender
from jobqd.observe import sdnotify
from jobqd.observe.logs import setup_logging
from jobqd.observe.proctitle import set_title
from jobqd.store.sql import Queries

log = logging.getLogger("jobqd.process")

MASTER_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR2,
    signal.SIGCHLD,
)
"""The signals the master handles; blocked around fork so none lands in a half-made child."""

_MASTERS_OWN = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
"""The signals a child ignores: the master coordinates what they ask for."""

_PR_SET_PDEATHSIG = 1

_lineage: dict[str, int] = {}
"""This child's master and the roll it was started in, set once by `become_child`; every
jobqd.processes row this process writes carries them (see jobqd.daemon.roll)."""


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent dies: a second line of
    defence behind the children's own parent-pid checks. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_child(
    *,
    master_pid: int,
    role: str,
    title: str,
    close_fds: Iterable[int],
    log_format: str,
    log_level: str,
    generation: int = 0,
) -> None:
    """Turn a freshly forked copy of the master into a clean child process, started in roll
    `generation`.

    Signals: TERM and QUIT get their default action until the role installs its own handlers;
    INT, HUP and USR2 are ignored, because a Ctrl-C, a reload or a roll reaches the master,
    which coordinates (`systemctl kill -s USR2` without `--kill-whom=main` signals them all).
    """
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    for signum in _MASTERS_OWN:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != master_pid:  # the master died before the death signal was armed
        os._exit(0)
    sdnotify.clear_environment()
    _lineage.update(master_pid=master_pid, generation=generation)
    setup_logging(log_format, log_level, role=role, name=title)
    set_title(title)


def run_and_exit(serve: Callable[[], int], name: str, fields: dict[str, object]) -> None:
    """Run the child's role and end the process with its exit code, whatever happens."""
    code = 1
    try:
        result = serve()
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        log.exception("%s failed: %s: %s", name, type(exc).__name__, exc, extra=fields)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


STATUS_INTERVAL = 1.0
"""Seconds between a child's status messages; the master's child_timeout is many of them."""

ROLES = {
    "worker": "jobqd.worker.process",
    "maintenance": "jobqd.maintenance.process",
    "http": "jobqd.http.server",
}
"""Each child kind's module; every one has `serve_child(ChildContext) -> int`. Imported in
the child, after fork, so the master never loads what only a child runs."""


@dataclass(frozen=True)
class ChildContext:
    """What the master hands a forked child: the same for every role, each takes its part."""

    settings: Any
    dsn: str
    sender: Sender
    parent_pid: int
    on_title: Callable[[str], None]
    queue: str | None = None
    index: int = 0
    # worker: (process row, how it died) of this queue's workers that died
    dead_workers: tuple[tuple[int, str], ...] = ()
    feed_fd: int | None = None  # http: the read end of the master's feed
    listener: socket.socket | None = None  # http: the socket the master bound to http.listen


def role_entry(kind: str) -> Callable[[ChildContext], int]:
    """The entry of the role `kind` (a key of ROLES)."""
    return importlib.import_module(ROLES[kind]).serve_child


class Stopping(enum.Enum):
    """How far a child is in stopping: TERM asks for a drain, QUIT (or a second TERM) for a
    fast stop. What each means is the role's (a worker drains its jobs, the others just end)."""

    NO = "no"
    DRAIN = "drain"
    FAST = "fast"


class ProcessRow:
    """A process's row in jobqd.processes: registered at start, heartbeated, deregistered at
    the end. A heartbeat that finds the row gone (the reaper took it for dead) registers again.
    In a child of the master, its metadata also says `master_pid` and `generation`."""

    def __init__(
        self,
        sql: Queries,
        role: str,
        queue: str | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.sql = sql
        self.role = role
        self.queue = queue
        self.fields = fields or {}
        self.process_id: int | None = None

    def register(self, conn: psycopg.Connection, metadata: dict[str, Any]) -> int:
        row = conn.execute(
            self.sql.processes_register,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "role": self.role,
                "queue": self.queue,
                "metadata": json.dumps({**metadata, **_lineage}),
            },
        ).fetchone()
        assert row is not None
        self.process_id = int(row[0])
        return self.process_id

    def heartbeat(self, conn: psycopg.Connection, metadata: dict[str, Any]) -> None:
        alive = conn.execute(
            self.sql.processes_heartbeat,
            {"process_id": self.process_id, "metadata": json.dumps({**metadata, **_lineage})},
        ).fetchone()
        if alive is None:
            self.removed(conn, metadata)

    def removed(self, conn: psycopg.Connection, metadata: dict[str, Any]) -> None:
        """The row is gone although this process lives: register it again."""
        log.warning("process row was removed (reaped?); registering again", extra=self.fields)
        self.register(conn, metadata)

    def deregister(self, conn: psycopg.Connection) -> None:
        if self.process_id is not None:
            conn.execute(self.sql.processes_deregister, {"process_id": self.process_id})


class ChildProcess:
    """The shared life of a child role. Subclasses set `role` and `log`, and override
    `fields()` and `metadata()`; they decide what `stopping` means for their work."""

    role: str = "child"
    log: logging.Logger = log

    def __init__(
        self,
        *,
        sender: Sender | None = None,
        parent_pid: int | None = None,
        on_title: Callable[[str], None] | None = None,
        row: ProcessRow | None = None,
    ) -> None:
        self.sender = sender
        self.parent_pid = parent_pid
        self.on_title = on_title or (lambda title: None)
        self.row = row
        self.stopping = Stopping.NO
        self.stop_requested_at = 0.0  # monotonic time of the first stop request
        self._master_lost = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def fields(self) -> dict[str, Any]:
        """Log fields naming this process."""
        return {}

    def metadata(self) -> dict[str, Any]:
        """What its jobqd.processes row says about it."""
        return {}

    # -- signals and wake-ups -----------------------------------------------------------------

    def install_signals(self) -> None:
        """TERM drains, QUIT stops fast; INT, HUP and USR2 are the master's. Signals
        also write to the wake pipe, so a sleeping loop wakes at once."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self.stop(Stopping.DRAIN))
        signal.signal(signal.SIGQUIT, lambda *_: self.stop(Stopping.FAST))
        for signum in _MASTERS_OWN:
            signal.signal(signum, signal.SIG_IGN)

    def stop(self, how: Stopping = Stopping.DRAIN) -> None:
        """Ask the loop to stop; a second drain request becomes fast."""
        if how is Stopping.FAST or self.stopping is Stopping.DRAIN:
            self.stopping = Stopping.FAST
        elif self.stopping is Stopping.NO:
            self.stopping = Stopping.DRAIN
            self.stop_requested_at = time.monotonic()
        self.wake()

    @property
    def wake_fd(self) -> int:
        """The read end of the wake pipe, for a loop with a selector of its own."""
        return self._wake_r

    def wake(self) -> None:
        """Make the loop's next (or current) wait return now; safe from any thread."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def wait(self, timeout: float, *fds: int) -> list[int]:
        """Sleep until `timeout`, a wake-up or one of `fds` is readable; returns those fds."""
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([self._wake_r, *fds], [], [], max(0.0, timeout))
            if self._wake_r in ready:
                self.drain_wake()
            return [fd for fd in ready if fd != self._wake_r]
        return []

    def master_gone(self) -> bool:
        """True (and draining) once the master that forked this process is gone."""
        if self.parent_pid is None or os.getppid() == self.parent_pid:
            return False
        self._orphaned("master is gone")
        return True

    def _orphaned(self, what: str) -> None:
        """No master: drain, not a fast stop, so that running work finishes and every
        outcome is written (a fast stop releases jobs that may finish a moment later, and
        they would run twice). A stop already under way (the parent-death TERM) goes on as
        it was; said once."""
        if self._master_lost:
            return
        self._master_lost = True
        self.log.warning("%s; finishing running work, then exiting", what, extra=self.fields())
        if self.stopping is Stopping.NO:
            self.stop(Stopping.DRAIN)

    # -- messages to the master -----------------------------------------------------------------

    def send(self, message: Message) -> bool:
        """Send `message` if there is a master to hear it. A closed pipe means the master is
        gone: drain. Returns whether it was sent."""
        if self.sender is None:
            return False
        try:
            self.sender.send(message)
        except OSError:
            self._orphaned("master pipe closed")
            return False
        return True

    def send_booted(self) -> None:
        process_id = self.row.process_id if self.row is not None else None
        queue = self.row.queue if self.row is not None else None
        self.send(Booted(self.role, process_id, queue))

    # -- the jobqd.processes row -----------------------------------------------------------------

    @property
    def process_id(self) -> int | None:
        return self.row.process_id if self.row is not None else None

    def register(self, conn: psycopg.Connection) -> None:
        assert self.row is not None
        self.row.register(conn, self.metadata())

    def heartbeat(self, conn: psycopg.Connection) -> None:
        assert self.row is not None
        self.row.heartbeat(conn, self.metadata())

    def deregister(self, conn: psycopg.Connection) -> None:
        if self.row is not None:
            self.row.deregister(conn)

"""Short-lived helper processes of the master, for work the master must not do itself.

The master forks at any time, so it holds no database connection and imports no application
code. What needs either (waiting for the database and migrating it at start, checking a
reloaded config's imports and tasks) runs in a fork of its own that reports JSON lines over a
pipe (progress, then its verdict) and exits. The master keeps supervising meanwhile: the pipe
is in its selector and the helper is reaped like a child.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from jobqd.daemon.ipc import Receiver
from jobqd.daemon.lifecycle import MASTER_SIGNALS, become_child, run_and_exit

Report = Callable[[dict[str, Any]], None]
"""How a helper's work sends a message to the master."""


@dataclass(eq=False)
class Helper:
    """One running helper: its name (`prepare`, `reload check`), pid, pipe and messages."""

    name: str
    pid: int
    fd: int
    deadline: float  # monotonic time after which the master kills it
    receiver: Receiver = field(init=False)
    messages: list[dict[str, Any]] = field(default_factory=list)
    listening: bool = True

    def __post_init__(self) -> None:
        self.receiver = Receiver(self.fd)

    def read(self) -> list[dict[str, Any]]:
        """The messages that arrived since the last read (all are kept in `messages`)."""
        new: list[dict[str, Any]] = []
        while self.listening:
            documents, still_open = self.receiver.read()
            new += documents
            if not still_open:
                self.listening = False
            if not documents:
                break
        self.messages += new
        return new

    @property
    def verdict(self) -> dict[str, Any] | None:
        """Its final message, if it sent one."""
        return next((m for m in reversed(self.messages) if m.get("kind") == "verdict"), None)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def start_helper(
    name: str,
    work: Callable[[Report], dict[str, Any]],
    *,
    deadline: float,
    close_fds: Iterable[int],
    log_format: str,
    log_level: str,
) -> Helper:
    """Fork a helper that runs `work(report)` and sends what it returns as its verdict.
    Raises OSError when it cannot fork."""
    read_fd, write_fd = os.pipe()
    master_pid = os.getpid()
    signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:
        closing = [read_fd, *close_fds]

        def main() -> int:
            become_child(
                master_pid=master_pid,
                role="master",
                title=name,
                close_fds=closing,
                log_format=log_format,
                log_level=log_level,
            )

            def report(message: dict[str, Any]) -> None:
                data = (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(write_fd, view) :]

            report({"kind": "verdict", **work(report)})
            return 0

        run_and_exit(main, name, {"child": name})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    return Helper(name, pid, read_fd, deadline=deadline)

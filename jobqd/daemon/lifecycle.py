"""What every child does right after fork, before it runs its role, and how it ends.

A forked child starts as a copy of the master: the master's signal handlers and wake-up fd,
the other children's pipes, NOTIFY_SOCKET, the master's log role and metric totals. All of that
is undone here. A child never returns into the master's code and never runs the master's
atexit handlers (the embedded Postgres handle is the master's): it always ends in `os._exit`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable

from jobqd.observe import sdnotify
from jobqd.observe.logs import setup_logging
from jobqd.observe.proctitle import set_title

log = logging.getLogger("jobqd.process")

MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)
"""The signals the master handles; blocked around fork so none lands in a half-made child."""

_PR_SET_PDEATHSIG = 1


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
) -> None:
    """Turn a freshly forked copy of the master into a clean child process.

    Signals: TERM and QUIT get their default action until the role installs its own handlers;
    INT and HUP are ignored, because a Ctrl-C or a reload reaches the master, which coordinates.
    """
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != master_pid:  # the master died before the death signal was armed
        os._exit(0)
    sdnotify.clear_environment()
    setup_logging(log_format, log_level, role=role)
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

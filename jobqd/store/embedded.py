"""The embedded PostgreSQL: a private server (pgserver) in a data directory, for a first run
and for tests. The daemon, jobqctl and the client find it the same way: `find` reads the
server's own postmaster.pid, and `start` returns what `find` says once the server runs.

pgserver keeps a list of the processes using a data directory and stops the server when the
last of them exits, but only from an atexit hook, which a SIGKILL, a crash or the OOM killer
never runs: the server would outlive its users for ever, and every later user would join a
list holding a dead pid, so it would never stop again. So `start` also starts a keeper, a
small process holding the read end of a pipe whose write end stays in the starting process
(and in whatever it forks: a master's children keep the server while they drain). When the
last holder is gone, however it went, the keeper reads EOF, takes that process and every
dead pid off pgserver's list, and stops the server if no living user is left.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jobqd.errors import DatabaseUnavailable, first_line

USER = "postgres"
"""The superuser pgserver's initdb creates; the embedded server trusts local connections."""
DATABASE = "postgres"

log = logging.getLogger("jobqd.embedded")

_lock = threading.Lock()
_kept: dict[Path, tuple[subprocess.Popen[bytes], int]] = {}  # data dir: keeper, pipe end


def default_data_dir() -> Path:
    """Where the embedded Postgres keeps its files when the config does not say: systemd's
    StateDirectory= when run as a unit, /var/lib/jobqd as root, else the user's data dir."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "pgdata"
    if os.geteuid() == 0:
        return Path("/var/lib/jobqd/pgdata")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "jobqd" / "pgdata"


def data_dir_or_default(data_dir: str | os.PathLike[str] | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def find(data_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The URL of the embedded server running in `data_dir` (default: `default_data_dir()`),
    or None when none runs there and accepts connections. Never starts one."""
    pidfile = data_dir_or_default(data_dir) / "postmaster.pid"
    try:
        lines = pidfile.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DatabaseUnavailable(f"cannot read {pidfile}: {exc.strerror or exc}") from None
    # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, shared
    # memory key, status ("ready" once it accepts connections)
    if len(lines) < 8 or not lines[0].strip().isdigit() or lines[7].strip() != "ready":
        return None
    if not _alive(int(lines[0])):
        return None
    port, socket_dir, listen = (line.strip() for line in lines[3:6])
    if socket_dir:
        return f"postgresql://{USER}@/{DATABASE}?host={quote(socket_dir, safe='/')}&port={port}"
    host = "localhost" if listen in ("", "*") else listen.split(",")[0].strip()
    return f"postgresql://{USER}@{host}:{port}/{DATABASE}"


def not_running(data_dir: str | os.PathLike[str] | None) -> str:
    """What to tell someone who wants the embedded server when it is not running."""
    return (
        f"the embedded PostgreSQL in {data_dir_or_default(data_dir)} is not running (it runs "
        "while jobqd does): start the daemon first (jobqd -c FILE), or give another database "
        "with -c FILE, --dsn URL or JOBQD_DATABASE_URL"
    )


def start(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Start (or join) the private Postgres in `data_dir` and watch over it for this process;
    return its URL. A second jobqd on the same directory shares the server instead of
    corrupting it; the server stops when the last of its users is gone."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers); its
            # fallback under /tmp is what we want anyway.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise DatabaseUnavailable(
            "database.url is 'embedded' but pgserver is not installed: "
            "pip install 'jobqd[embedded]', or set database.url to a PostgreSQL URL"
        ) from exc
    path = data_dir_or_default(data_dir).resolve()
    # pgserver narrates every step at INFO; only its warnings and errors are news to operators.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with _lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path not in _kept:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                pgserver.get_server(path, cleanup_mode="stop")
            except Exception as exc:
                raise DatabaseUnavailable(
                    f"the embedded PostgreSQL in {path} could not start: {first_line(exc)} "
                    f"(its log: {path / 'log'})"
                ) from None
            _kept[path] = _start_keeper(path)
    url = find(path)
    if url is None:
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL in {path} stopped right after it started "
            f"(its log: {path / 'log'})"
        )
    return url


def _start_keeper(path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The keeper for this process: it gets the read end of a pipe on its stdin, this
    process keeps the write end (closed on exec, kept across fork). Its own session, so a
    Ctrl-C meant for the daemon does not reach it."""
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _KEEPER, str(path), str(os.getpid())],
            stdin=read_fd,
            start_new_session=True,
        )
    except OSError:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return process, write_fd


_KEEPER = "import sys; from jobqd.store.embedded import keeper; sys.exit(keeper())"


def release(path: Path, gone: int) -> str:
    """Take process `gone` and every dead pid off pgserver's list of the server's users and
    stop the server when no living user is left; returns what was done, for the log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, as in start()
        from pgserver.postgres_server import PostgresServer
        from pgserver.utils import DiskList

    with PostgresServer._lock:  # the lock pgserver holds while it starts or joins a server
        users = DiskList(path / ".handle_pids.json")
        left = [pid for pid in users.get() if pid != gone and _alive(pid)]
        users.put(left)
        if left:
            return f"still used by pid {', '.join(map(str, left))}"
        if find(path) is None:
            return "already stopped"
        _stop(path)
        return "stopped"


def _stop(path: Path) -> None:
    from pgserver._commands import pg_ctl

    user: Any = "pgserver" if os.geteuid() == 0 else None  # pgserver runs it as that user
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=path, user=user)


def keeper(argv: list[str] | None = None) -> int:
    """The keeper process's life: wait for EOF on stdin, then `release`."""
    import signal

    from jobqd.observe.logs import setup_logging
    from jobqd.observe.proctitle import set_title

    parser = argparse.ArgumentParser(prog="jobqd embedded keeper")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("pid", type=int, help="the process that started or joined the server")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)  # it ends when its users have, not before
    setup_logging("auto", "info", role="embedded keeper")
    set_title(f"embedded keeper {args.data_dir}")  # ps: what it is and which server it keeps
    while os.read(0, 4096):
        pass
    try:
        outcome = release(args.data_dir, args.pid)
    except Exception as exc:
        log.error(
            "the embedded PostgreSQL in %s may still run after pid %d: %s; stop it with "
            "pg_ctl -D %s stop",
            args.data_dir,
            args.pid,
            first_line(exc),
            args.data_dir,
        )
        return 1
    if outcome == "stopped":
        log.info(
            "stopped the embedded PostgreSQL in %s: pid %d was its last user",
            args.data_dir,
            args.pid,
        )
    return 0

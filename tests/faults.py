"""Fault injection for the tests and the chaos soak: a PostgreSQL cluster of one's own to stop,
kill and restart, a TCP proxy that can go silent or cut its links, and the daemon as a process
(`e2e_daemon.Daemon`) with the pids of its children by title, to signal them.

Everything listens on 127.0.0.1 only. The cluster lives in a temp dir that `cleanup()` always
removes, stopping the server first; the shared server on 5432 is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_daemon import Daemon, daemon_env, title
from helpers import answers, wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(*command: str) -> list[str]:
    """`command`, run as the postgres OS user when we are root (initdb refuses root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


def cluster_unavailable() -> str | None:
    """Why a throw-away cluster cannot be made here, or None when it can (for pytest.skip)."""
    if not (PG_BIN / "initdb").exists():
        return f"needs PostgreSQL server binaries in {PG_BIN}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "needs runuser to run PostgreSQL as the postgres user"
    return None


# Runs beside a cluster in a session of its own: when the process that made the cluster is
# gone (even SIGKILLed) its end of the pipe closes, and this stops the server and removes it.
_GUARD = """
import shutil, subprocess, sys
sys.stdin.buffer.read()
subprocess.run(sys.argv[1:-1], capture_output=True, timeout=60)
shutil.rmtree(sys.argv[-1], ignore_errors=True)
"""


class Cluster:
    """A throw-away PostgreSQL 15 cluster: initdb in a temp dir, a free port of its own.

    Use it as a context manager, or call `cleanup()`, which stops the server (immediate) and
    removes the directory whatever state it is in; a guard process does the same if the
    process that made it dies first.
    """

    def __init__(self, *, settings: dict[str, str] | None = None, prefix: str = "jobqd-pg-"):
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = free_port()
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "max_connections": "200",
            **(settings or {}),
        }
        self.running = False
        stop = as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        self._guard = subprocess.Popen(
            [sys.executable, "-c", _GUARD, *stop, str(self.dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        except BaseException:
            self.cleanup()
            raise

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *command: str, timeout: float = 60) -> None:
        try:
            done = subprocess.run(as_postgres(*command), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(command)} timed out\n{self.log_tail()}") from None
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}): "
                f"{done.stderr.decode(errors='replace')}{done.stdout.decode(errors='replace')}"
                f"\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for error messages."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(["--- postgres log ---", *text])

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "30", *args)

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.dir}"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._pg_ctl("-o", options, "-l", str(self.log_path), "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`fast`: end sessions and shut down cleanly; `immediate`: like a crash (recovery on
        the next start)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown stop mode {mode!r}")
        self._pg_ctl("-m", mode, "stop")
        self.running = False

    def restart(self, mode: str = "fast", *, down: float = 0.0) -> None:
        """Stop in `mode`, stay down `down` seconds, start again."""
        self.stop(mode)
        time.sleep(down)
        self.start()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.data.exists():
                pg_ctl = str(PG_BIN / "pg_ctl")
                subprocess.run(
                    as_postgres(pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"),
                    capture_output=True,
                    timeout=60,
                )
        self.running = False
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._guard.stdin is not None:
            self._guard.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._guard.wait(60)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@contextlib.contextmanager
def cluster(**kwargs: Any) -> Iterator[Cluster]:
    """A started throw-away cluster, stopped and removed on exit."""
    with Cluster(**kwargs) as made:
        made.start()
        yield made


class _Link:
    """One client connection relayed to the server: two sockets and, per direction, the bytes
    held back while the proxy is blackholed. A link accepted during a blackhole has no server
    socket until `heal()`: like a SYN lost on a dead path, it never reaches the server."""

    def __init__(self, client: socket.socket, server: socket.socket | None) -> None:
        self.client, self.server = client, server
        self.to_server, self.to_client = bytearray(), bytearray()
        self.lock = threading.RLock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.closed = True
        for sock in (self.client, self.server):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class Proxy:
    """A TCP relay on 127.0.0.1 in front of a server, with faults.

    - `pass`: bytes flow both ways.
    - `blackhole()`: nothing is forwarded in either direction, but both sockets stay open and
      the kernel keeps acknowledging, as behind a middlebox on a dead path (a half-open link):
      keepalives are answered, only a client-side deadline notices. Bytes sent meanwhile are
      held and delivered on `heal()`, as TCP would retransmit them once the path is back; a
      connection accepted meanwhile reaches the server only then. A side that closes its
      socket still closes the other (so a session the client gave up ends on the server).
    - `cut()`: every link is closed, and new connections are closed as soon as accepted,
      until `heal()`.
    - `heal()`: back to `pass`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @classmethod
    def to(cls, dsn: str) -> Proxy:
        """A proxy in front of the server `dsn` names (TCP only)."""
        params = conninfo_to_dict(dsn)
        return cls(params.get("host") or "127.0.0.1", int(params.get("port") or 5432))

    def dsn(self, dsn: str) -> str:
        """`dsn`, pointed at the proxy."""
        return make_conninfo(dsn, host="127.0.0.1", port=str(self.port))

    @property
    def links(self) -> int:
        """Connections relayed (or held) right now."""
        with self._lock:
            return len(self._links)

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def cut(self) -> None:
        self.mode = "cut"
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close()

    def heal(self) -> None:
        self.mode = "pass"
        with self._lock:
            links = list(self._links)
        for link in links:
            if link.server is None and not self._connect(link):
                continue
            with link.lock:
                self._send(link, link.server, link.to_server)
                self._send(link, link.client, link.to_client)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            link = _Link(client, None)
            with self._lock:
                self._links.add(link)
            self._start(link, client)
            if self.mode != "blackhole":
                self._connect(link)

    def _connect(self, link: _Link) -> bool:
        """Give a link its server socket; close it when the server is down."""
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._drop(link)  # the server is down: so is the relay
            return False
        server.settimeout(None)
        with link.lock:
            if link.closed:  # cut while we connected
                server.close()
                return False
            link.server = server
            self._send(link, server, link.to_server)  # what the client sent while we connected
        self._start(link, server)
        return True

    def _start(self, link: _Link, src: socket.socket) -> None:
        threading.Thread(
            target=self._pump, args=(link, src), name="proxy-pump", daemon=True
        ).start()

    def _send(self, link: _Link, dst: socket.socket | None, held: bytearray) -> None:
        """Forward what is held for `dst` (under link.lock)."""
        if dst is not None and held and self.mode == "pass":
            data = bytes(held)
            held.clear()
            try:
                dst.sendall(data)
            except OSError:
                link.close()  # both pumps then end, and drop the link

    def _pump(self, link: _Link, src: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with link.lock:
                    towards_server = src is link.client
                    held = link.to_server if towards_server else link.to_client
                    held += data
                    self._send(link, link.server if towards_server else link.client, held)
        except OSError:
            pass
        self._drop(link)

    def _drop(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
        link.close()


# -- the daemon as a process ----------------------------------------------------------------


def get_json(port: int, path: str) -> tuple[int | None, Any]:
    """(status, JSON body) of GET path, or (None, None) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, None


def launch(
    directory: Path,
    dsn: str,
    config: dict[str, Any],
    *,
    ledger_dsn: str | None = None,
    env: dict[str, str] | None = None,
) -> Daemon:
    """Start `jobqd -c directory/jobqd.yaml` (JSON log in directory/daemon.log) for `config`,
    with `env` added to its environment.

    The test tasks reach the database at `ledger_dsn` (default `dsn`): give the server's own
    address when `dsn` goes through a proxy, so the evidence does not share the fault.
    """
    directory.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(directory, dsn, daemon_env(ledger_dsn or dsn, directory, **(env or {})))
    daemon.write_config(config)
    return daemon.start()


def titled(daemon: Daemon, prefix: str) -> dict[int, str]:
    """The daemon's live children whose title starts with `jobqd: PREFIX`, pid -> title."""
    return {
        pid: text for pid, text in daemon.children().items() if text.startswith(f"jobqd: {prefix}")
    }


def workers(daemon: Daemon) -> dict[int, str]:
    """The daemon's live worker processes, pid -> title."""
    return titled(daemon, "worker ")


def processes_titled(prefix: str) -> dict[int, str]:
    """Every live process on the machine whose title starts with `jobqd: PREFIX` (children
    whose master is gone included), pid -> title."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and title(int(entry)).startswith(f"jobqd: {prefix}"):
            found[int(entry)] = title(int(entry))
    return found


def send(pid: int, signum: signal.Signals) -> bool:
    """Signal `pid`; False when it is already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


class Freezer:
    """SIGSTOP processes and SIGCONT them after a while; `thaw_all()` (always call it, or use
    it as a context manager) wakes whatever is still stopped."""

    def __init__(self) -> None:
        self._timers: dict[int, threading.Timer] = {}
        self._lock = threading.Lock()

    def freeze(self, pid: int, seconds: float) -> bool:
        if not send(pid, signal.SIGSTOP):
            return False
        timer = threading.Timer(seconds, self.thaw, args=(pid,))
        timer.daemon = True
        with self._lock:
            self._timers[pid] = timer
        timer.start()
        return True

    def thaw(self, pid: int) -> None:
        with self._lock:
            timer = self._timers.pop(pid, None)
        if timer is not None:
            timer.cancel()
            send(pid, signal.SIGCONT)

    @property
    def frozen(self) -> list[int]:
        with self._lock:
            return list(self._timers)

    def thaw_all(self) -> None:
        for pid in self.frozen:
            self.thaw(pid)

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw_all()


# -- pgbouncer ------------------------------------------------------------------------------

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
needs_pgbouncer = pytest.mark.skipif(
    not os.path.exists(PGBOUNCER), reason="pgbouncer is not installed (apt-get install pgbouncer)"
)


@contextlib.contextmanager
def pgbouncer(dsn: str, *, pool_mode: str, ignore_options: bool) -> Iterator[str]:
    """A throw-away pgbouncer in front of the test server; yields a DSN through it."""
    params = conninfo_to_dict(dsn)
    host = params.get("host") or ""
    if not host or host.startswith("/"):
        pytest.skip("needs the test server on TCP; the embedded fallback has a unix socket only")
    with tempfile.TemporaryDirectory(prefix="jobqd-pgbouncer-") as tmp:
        port = free_port()
        ignore = "options,extra_float_digits" if ignore_options else "extra_float_digits"
        Path(tmp, "pgbouncer.ini").write_text(
            f"""[databases]
* = host={host} port={params.get("port") or 5432} user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = {pool_mode}
ignore_startup_parameters = {ignore}
logfile = {tmp}/pgbouncer.log
pidfile = {tmp}/pgbouncer.pid
"""
        )
        command = [PGBOUNCER, "-d", f"{tmp}/pgbouncer.ini"]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            shutil.chown(tmp, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True)
        try:
            through = make_conninfo(dsn, host="127.0.0.1", port=str(port))
            wait_for(lambda: answers(through), timeout=10, what="pgbouncer up")
            yield through
        finally:
            pid = int(Path(tmp, "pgbouncer.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not Path(tmp, "pgbouncer.pid").exists(), timeout=10, what="down")

"""The daemon speaks sd_notify to a NOTIFY_SOCKET of the test's own, as systemd would see it:
only the master sends (NotifyAccess=main), READY after the children booted, WATCHDOG at half of
WATCHDOG_USEC, RELOADING then READY around a reload, STOPPING on drain."""

from __future__ import annotations

import itertools
import signal
import socket
import statistics
import struct
import time

import psycopg
import pytest
from e2e_daemon import Daemon, base_config, daemon_env
from helpers import scalar, wait_for

from jobqd.store.locks import lock_key

_UCRED = struct.Struct("3i")  # pid, uid, gid


class NotifySocket:
    """A datagram socket like systemd's, recording (sender pid, fields) per message."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.messages: list[tuple[int, float, dict[str, str]]] = []

    def receive(self) -> list[tuple[int, float, dict[str, str]]]:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return self.messages
            pid = next(
                _UCRED.unpack(payload[: _UCRED.size])[0]
                for level, kind, payload in ancdata
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((pid, time.monotonic(), fields))

    def having(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        return [f for _, _, f in self.receive() if key in f and (value is None or f[key] == value)]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def test_ready_status_watchdog_reloading_stopping(jobqd, ledger, notify_socket):
    config = base_config(ledger)
    config["queues"]["default"] = {"processes": 2, "concurrency": 3}
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"}
    daemon = jobqd(config, env=env)

    ready = wait_for(lambda: notify_socket.having("READY", "1"), what="READY=1")[0]
    booted = [r for r in daemon.logs() if r.get("message", "").endswith(" booted")]
    assert {r["child"] for r in booted} >= {"worker default#0", "worker default#1"}
    assert ready["STATUS"].startswith("2 workers, 0/6 slots busy, leader: ")

    wait_for(lambda: len(notify_socket.having("WATCHDOG")) >= 3, what="three WATCHDOG=1 pings")
    pings = [t for _, t, f in notify_socket.receive() if f.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.15 < statistics.median(gaps) < 0.3, gaps  # every 0.2s: half of WATCHDOG_USEC

    daemon.signal(signal.SIGHUP)
    [reloading] = wait_for(lambda: notify_socket.having("RELOADING", "1"), what="RELOADING=1")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    wait_for(lambda: len(notify_socket.having("READY", "1")) == 2, what="READY=1 after reload")

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert notify_socket.having("STOPPING", "1")
    order = [k for _, _, f in notify_socket.receive() for k in f if k != "STATUS"]
    assert order.index("READY") < order.index("RELOADING") < order.index("STOPPING")
    assert {pid for pid, _, _ in notify_socket.receive()} == {daemon.pid}


def test_a_start_held_up_by_another_nodes_migration_reports_progress(
    empty_dsn, tmp_path, notify_socket
):
    env = daemon_env(empty_dsn, tmp_path, NOTIFY_SOCKET=notify_socket.path)
    daemon = Daemon(tmp_path, empty_dsn, env)
    daemon.write_config(base_config(empty_dsn))
    try:
        with psycopg.connect(empty_dsn, autocommit=True) as other_node:
            other_node.execute("SELECT pg_advisory_lock(%s)", (lock_key("jobqd", "migrate"),))
            daemon.start()
            [extend] = wait_for(
                lambda: notify_socket.having("EXTEND_TIMEOUT_USEC"), timeout=15, what="progress"
            )
            assert extend["EXTEND_TIMEOUT_USEC"] == "15000000"
            assert extend["STATUS"].startswith("migrating (or waiting for another node's) (")
            assert daemon.find_log(lambda r: "still at it after" in r.get("message", ""))
            assert not notify_socket.having("READY")
        # The other node's session ended, and its lock with it: this one migrates and starts.
        wait_for(lambda: notify_socket.having("READY", "1"), what="READY=1 after the lock")
        assert scalar(empty_dsn, "SELECT count(*) FROM jobqd.migrations") >= 1
    finally:
        daemon.stop()

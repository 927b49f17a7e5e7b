import logging
import os
import socket
import time
import uuid

import pytest

from jobqd.observe import sdnotify


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_sends_fields_as_one_datagram(receiver):
    assert sdnotify.notify("READY=1", "STATUS=3 workers running")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=3 workers running"


def test_abstract_socket(monkeypatch):
    name = f"jobqd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_reloading_sends_monotonic_usec(receiver):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = receiver.recv(4096).decode().split("\n")
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_without_notify_socket_is_a_no_op():
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("address", ["/nonexistent/jobqd/notify", "vsock:2:1234"])
def test_failures_never_raise(monkeypatch, caplog, address):
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with caplog.at_level(logging.DEBUG, logger="jobqd.observe.sdnotify"):
        assert sdnotify.notify("READY=1") is False
    assert caplog.records and all(r.levelno == logging.DEBUG for r in caplog.records)


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "1", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert sdnotify.watchdog_interval() == expected


def test_clear_environment(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    sdnotify.clear_environment()
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_interval() is None

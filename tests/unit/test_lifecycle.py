"""The child lifecycle shared by every role, without a master: stop states, wake-ups, the
parent check and a closed master pipe."""

from __future__ import annotations

import os

from jobqd.daemon.ipc import Sender, Status
from jobqd.daemon.lifecycle import ROLES, ChildProcess, Stopping, role_entry


def test_term_drains_and_a_second_request_stops_fast():
    child = ChildProcess()
    assert child.stopping is Stopping.NO
    child.stop(Stopping.DRAIN)
    assert child.stopping is Stopping.DRAIN and child.stop_requested_at > 0
    child.stop(Stopping.DRAIN)
    assert child.stopping is Stopping.FAST


def test_quit_stops_fast_at_once():
    child = ChildProcess()
    child.stop(Stopping.FAST)
    assert child.stopping is Stopping.FAST


def test_a_stop_wakes_a_waiting_loop():
    child = ChildProcess()
    child.stop()
    read_fd, write_fd = os.pipe()
    assert child.wait(5.0, read_fd) == []  # returned at once, on the wake-up alone
    os.write(write_fd, b"x")
    assert child.wait(5.0, read_fd) == [read_fd]
    assert child.wait(0.0) == []  # the wake pipe was drained


def test_a_closed_master_pipe_drains():
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    child = ChildProcess(sender=Sender(write_fd))
    assert child.send(Status()) is False
    assert child.stopping is Stopping.DRAIN
    assert child.send(Status()) is False
    assert child.stopping is Stopping.DRAIN  # said again, still a drain: not a fast stop


def test_a_new_parent_means_the_master_is_gone_and_the_child_drains():
    assert ChildProcess(parent_pid=os.getppid()).master_gone() is False
    assert ChildProcess().master_gone() is False
    orphan = ChildProcess(parent_pid=os.getppid() + 1)
    assert orphan.master_gone() is True and orphan.stopping is Stopping.DRAIN
    assert orphan.master_gone() is True and orphan.stopping is Stopping.DRAIN
    terminated = ChildProcess(parent_pid=os.getppid() + 1)
    terminated.stop(Stopping.DRAIN)  # the parent-death TERM came first
    assert terminated.master_gone() is True and terminated.stopping is Stopping.DRAIN


def test_every_role_has_an_entry():
    assert all(callable(role_entry(kind)) for kind in ROLES)

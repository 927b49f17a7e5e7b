"""`jobqctl roll` following a master's title (jobqd.cli.roll), with the title, the signal and
the clock played by the test: what it says at each outcome."""

from __future__ import annotations

import signal

import pytest

from jobqd.cli import roll
from jobqd.daemon.roll import TitleState


class Master:
    """A master whose title moves through `titles` (one per look) once it got SIGUSR2."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *titles: TitleState | None) -> None:
        self.before, self.after = titles[0], list(titles[1:])
        self.signals: list[int] = []
        self.now = 0.0
        monkeypatch.setattr(roll, "master_state", self.state)
        monkeypatch.setattr(roll.os, "kill", lambda pid, signum: self.signals.append(signum))

    def state(self, pid: int) -> TitleState | None:
        if not self.signals:
            return self.before
        return self.after.pop(0) if len(self.after) > 1 else self.after[0]

    def follow(self, timeout: float = 10.0) -> tuple[roll.Outcome, list[str]]:
        notes: list[str] = []

        def sleep(seconds: float) -> None:
            self.now += seconds

        outcome = roll.roll_master(
            7, host="app1", timeout=timeout, note=notes.append, clock=lambda: self.now, sleep=sleep
        )
        return outcome, notes


def test_it_signals_once_and_reports_each_step_until_done(monkeypatch):
    master = Master(
        monkeypatch,
        TitleState(2, "done", 3, 3),
        TitleState(2, "done", 3, 3),  # the signal is not handled yet
        TitleState(3, "checking"),
        TitleState(3, "rolling", 0, 2, "worker a#0"),
        TitleState(3, "rolling", 0, 2, "worker a#0"),
        TitleState(3, "rolling", 1, 2, "worker b#0"),
        TitleState(3, "done", 2, 2),
    )
    outcome, notes = master.follow()
    assert master.signals == [signal.SIGUSR2]
    assert (outcome.roll, outcome.state, outcome.replaced, outcome.total) == (3, "done", 2, 2)
    assert notes == [
        "app1 master 7: roll 3 checking",
        "app1 master 7: roll 3 rolling, 0/2 workers replaced (replacing worker a#0)",
        "app1 master 7: roll 3 rolling, 1/2 workers replaced (replacing worker b#0)",
    ]


def test_a_master_already_rolling_is_not_signalled(monkeypatch):
    master = Master(monkeypatch, TitleState(4, "rolling", 1, 5, "worker a#1"))
    with pytest.raises(roll.RollFailed, match="master 7 on app1 is already rolling"):
        master.follow()
    assert master.signals == []


def test_a_failed_roll_says_where_and_what_next(monkeypatch):
    master = Master(monkeypatch, TitleState(), TitleState(1, "failed", 1, 3, "worker b#0"))
    with pytest.raises(roll.RollFailed) as failed:
        master.follow()
    assert str(failed.value).startswith(
        "roll 1 of master 7 on app1 failed at worker b#0 (1/3 workers replaced): its "
        "replacement did not boot, so it and the workers not yet replaced keep running"
    )
    master = Master(monkeypatch, TitleState(), TitleState(1, "failed", 0, 0, "version"))
    with pytest.raises(roll.RollFailed, match="jobqd itself changed on disk: restart"):
        master.follow()


def test_a_roll_that_outlasts_the_timeout_is_left_running_and_said_so(monkeypatch):
    master = Master(monkeypatch, TitleState(), TitleState(1, "rolling", 1, 4, "worker a#1"))
    with pytest.raises(roll.RollFailed) as failed:
        master.follow(timeout=3)
    assert str(failed.value) == (
        "master 7 on app1 did not finish its roll within 3s (roll 1 rolling, 1/4 workers "
        "replaced (replacing worker a#1)); it goes on: follow it in `jobqctl status` or the "
        "daemon's log"
    )
    assert master.now == pytest.approx(3.0)


def test_a_master_that_exits_mid_roll_is_an_error(monkeypatch):
    master = Master(monkeypatch, TitleState(), TitleState(1, "rolling", 0, 2, "worker a#0"), None)
    with pytest.raises(roll.RollFailed, match="exited during its roll"):
        master.follow()

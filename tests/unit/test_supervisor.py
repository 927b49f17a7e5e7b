"""The master without real children, as gunicorn's test_arbiter does it: os.fork returns a
made-up pid in the parent, os.kill records the signal, os.waitpid reports the exits a test
scripts, and the master's clock is a fake one the test moves. What is pinned here is today's
behaviour of restarts, reloads, stop deadlines and the status line."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from jobqd import config
from jobqd.config.settings import parse
from jobqd.daemon import report, supervisor
from jobqd.daemon import roll as roll_module
from jobqd.daemon.children import (
    CRASH_LOOP_AFTER,
    LEADER_SILENCE,
    MAINTENANCE,
    RESTART_BACKOFF,
    STABLE_AFTER,
    WORKER,
    Child,
    ChildSpec,
    Restarts,
    specs_for,
)
from jobqd.daemon.prepare import prepare
from jobqd.daemon.reload import plan_reload
from jobqd.daemon.supervisor import (
    EXIT_RECYCLE,
    FAST_STOP_GRACE,
    QUIT_GRACE,
    Supervisor,
    describe_exit,
)
from jobqd.errors import EXIT_BOOT_FAILED, EXIT_OK

TERM, QUIT, KILL = signal.SIGTERM, signal.SIGQUIT, signal.SIGKILL

BASE = """\
database: postgresql://127.0.0.1:1/unused
shutdown_timeout: 3s
child_timeout: 60s
queues:
  a: {processes: 1, concurrency: 4}
  b: {processes: 1, concurrency: 2}
"""


def exited(code: int) -> int:
    """The wait status of a process that exited with `code`."""
    return code << 8


def within(value: float, expected: float, jitter: float = RESTART_BACKOFF.jitter) -> bool:
    return expected * (1 - jitter) - 1e-9 <= value <= expected * (1 + jitter) + 1e-9


class Clock:
    """The master's `time`: monotonic time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = float(int(time.monotonic()))  # whole seconds: the sums below are exact

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class Processes:
    """os.fork, os.waitpid and os.kill for children that never run."""

    def __init__(self) -> None:
        self._next_pid = 40_000
        self.alive: set[int] = set()
        self.exits: list[tuple[int, int]] = []  # exited, not yet reaped
        self.signals: list[tuple[int, int]] = []
        self.fork_error: OSError | None = None
        self.exit_on: set[int] = set()  # signals that make a child exit at once

    def fork(self) -> int:
        if self.fork_error is not None:
            raise self.fork_error
        self._next_pid += 1
        self.alive.add(self._next_pid)
        return self._next_pid

    def kill(self, pid: int, signum: int) -> None:
        if pid not in self.alive and all(p != pid for p, _ in self.exits):
            raise ProcessLookupError(pid)
        self.signals.append((pid, signum))
        if signum in self.exit_on and pid in self.alive:
            self.exit(pid, signum)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        assert (pid, options) == (-1, os.WNOHANG), "the master only polls for any child"
        if self.exits:
            return self.exits.pop(0)
        if self.alive:
            return 0, 0
        raise ChildProcessError

    def exit(self, pid: int, status: int) -> None:
        self.alive.remove(pid)
        self.exits.append((pid, status))

    def sent(self, pid: int) -> list[int]:
        """The signals `pid` was sent, in order."""
        return [s for p, s in self.signals if p == pid]


@pytest.fixture(autouse=True)
def _no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(supervisor, "time", fake)
    return fake


@pytest.fixture
def processes(monkeypatch: pytest.MonkeyPatch) -> Processes:
    fake = Processes()
    monkeypatch.setattr(os, "fork", fake.fork)
    monkeypatch.setattr(os, "kill", fake.kill)
    monkeypatch.setattr(os, "waitpid", fake.waitpid)
    return fake


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "jobqd.yaml"
    path.write_text(BASE)
    return path


@pytest.fixture
def master(config_path: Path, clock: Clock, processes: Processes):
    """A master with its children started (none booted yet); its fds are closed afterwards."""
    made = Supervisor(config.load(config_path), config_path=str(config_path), migrate=False)
    made.database_ready()
    made._converge(clock.now)
    yield made
    for child in made.children.values():
        child.close()
    made.selector.close()
    os.close(made._wake_r)
    os.close(made._wake_w)


def child(master: Supervisor, name: str) -> Child:
    """The live (not stopping) child filling the spec called `name`."""
    (found,) = [
        c for c in master.children.values() if c.spec.name == name and c.stopping_since is None
    ]
    return found


def boot(master: Supervisor, target: Child, process_id: int | None = None) -> None:
    """What the master records when `target` says it booted (the message is ipc's business)."""
    now = supervisor.time.monotonic()
    target.booted_at = target.last_heard = now
    target.process_id = process_id
    master._restarts(target.spec).booted()
    if target.spec.kind == WORKER:
        master._worker_booted = True


def send_signal(master: Supervisor, signum: int) -> None:
    """Deliver `signum` the way the handler does: its number as a byte on the wake-up pipe.
    A HUP's config check (a helper process) is played as passing, with its real verdict path."""
    os.write(master._wake_w, bytes([signum]))
    master._handle_signals()
    if signum == signal.SIGHUP and master._checker is not None:
        check_says(master, errors=[])


def check_says(master: Supervisor, *, errors: list[str]) -> None:
    """The reload check helper reports `errors` and exits."""
    checker = master._checker
    checker.messages.append({"kind": "verdict", "errors": errors, "warnings": []})
    del master.helpers[checker.pid]
    master._helper_exited(checker, exited(0))


def restart(master: Supervisor, clock: Clock, name: str) -> Child:
    """Let the restart delay of `name` pass and converge: its replacement is started."""
    spec = next(s for s in master.specs if s.name == name)
    clock.now = max(clock.now, master._restarts(spec).next_start)
    master._converge(clock.now)
    return child(master, name)


# -- restarts -----------------------------------------------------------------------------


def test_the_master_starts_one_child_per_spec(master, processes):
    names = sorted(c.spec.name for c in master.children.values())
    assert names == ["maintenance", "worker a#0", "worker b#0"]
    assert set(master.children) == processes.alive
    assert child(master, "worker a#0").concurrency == 4


def test_a_child_that_exits_is_restarted_after_a_doubling_backoff(master, processes, clock):
    for failures, expected in enumerate([0.5, 1.0, 2.0, 4.0], start=1):
        worker = child(master, "worker a#0")
        boot(master, worker)
        clock.advance(1.0)
        processes.exit(worker.pid, exited(1))
        master._reap()
        assert worker.pid not in master.children
        restarts = master.restarts[worker.spec.ident]
        assert restarts.total == failures
        # dying after boot keeps the growing backoff, and three deaths in the window are a loop
        assert restarts.crash_looping == (failures >= CRASH_LOOP_AFTER)
        assert within(restarts.next_start - clock.now, expected)
        clock.advance(restarts.next_start - clock.now - 0.25)
        master._converge(clock.now)
        assert [c for c in master.children.values() if c.spec == worker.spec] == []
        assert restart(master, clock, "worker a#0").pid != worker.pid


def test_a_child_that_ran_stable_after_seconds_starts_the_backoff_over(master, processes, clock):
    for _ in range(3):
        worker = child(master, "worker a#0")
        boot(master, worker)
        processes.exit(worker.pid, exited(1))
        master._reap()
        restart(master, clock, "worker a#0")
    worker = child(master, "worker a#0")
    boot(master, worker)
    clock.advance(STABLE_AFTER)
    processes.exit(worker.pid, exited(1))
    master._reap()
    restarts = master.restarts[worker.spec.ident]
    assert restarts.total == 4
    assert within(restarts.next_start - clock.now, 0.5)


def test_exits_before_booting_make_a_crash_loop_retried_at_the_cap(master, processes, clock):
    b0 = child(master, "worker b#0")
    boot(master, b0)
    for n in range(1, CRASH_LOOP_AFTER + 1):
        worker = child(master, "worker a#0")
        processes.exit(worker.pid, exited(1))
        master._reap()
        restarts = master.restarts[worker.spec.ident]
        assert restarts.boot_failures == n
        assert restarts.crash_looping == (n == CRASH_LOOP_AFTER)
        master._check_boot_failure()
        restart(master, clock, "worker a#0")
    assert restarts.next_start - clock.now <= 0
    assert master._stopping is None  # a worker booted once: the others keep running
    assert master.status_line().endswith("; crash loop: worker a#0")

    looping = child(master, "worker a#0")
    processes.exit(looping.pid, exited(1))
    master._reap()
    assert restarts.next_start - clock.now == pytest.approx(RESTART_BACKOFF.cap)

    boot(master, restart(master, clock, "worker a#0"))
    assert not restarts.crash_looping and restarts.boot_failures == 0
    assert "crash loop" not in master.status_line()


def test_no_worker_ever_booting_stops_the_master_with_exit_boot_failed(master, processes, clock):
    for _ in range(CRASH_LOOP_AFTER - 1):
        for name in ("worker a#0", "worker b#0"):
            processes.exit(child(master, name).pid, exited(1))
        master._reap()
        master._check_boot_failure()
        assert master._stopping is None
        for name in ("worker a#0", "worker b#0"):
            restart(master, clock, name)
    processes.exit(child(master, "worker a#0").pid, exited(1))
    master._reap()
    master._check_boot_failure()
    assert master._stopping is None  # worker b#0 may still boot
    processes.exit(child(master, "worker b#0").pid, exited(1))
    master._reap()
    maintenance = child(master, "maintenance")
    master._check_boot_failure()
    assert master._stopping == "fast" and master._exit_code == EXIT_BOOT_FAILED
    assert processes.sent(maintenance.pid) == [QUIT]


def test_a_recycled_worker_is_replaced_at_once_without_counting_a_restart(master, processes, clock):
    worker = child(master, "worker a#0")
    boot(master, worker)
    clock.advance(1.0)
    processes.exit(worker.pid, exited(EXIT_RECYCLE))
    master._reap()
    restarts = master.restarts[worker.spec.ident]
    assert restarts.next_start == clock.now
    assert restarts.total == 0 and restarts.failures == 0
    master._converge(clock.now)
    assert child(master, "worker a#0").pid != worker.pid


def test_exit_recycle_before_booting_is_an_ordinary_failure(master, processes, clock):
    worker = child(master, "worker a#0")
    processes.exit(worker.pid, exited(EXIT_RECYCLE))
    master._reap()
    restarts = master.restarts[worker.spec.ident]
    assert restarts.total == 1 and restarts.boot_failures == 1
    assert within(restarts.next_start - clock.now, 0.5)


def test_a_dead_workers_process_id_goes_to_the_next_worker_of_its_queue(master, processes, clock):
    worker = child(master, "worker a#0")
    boot(master, worker, process_id=77)
    processes.exit(worker.pid, signal.SIGKILL)
    master._reap()
    assert master._dead_workers == {"a": [(77, "killed by SIGKILL (out of memory?)")]}

    processes.fork_error = OSError(11, "Resource temporarily unavailable")
    clock.now = master.restarts[worker.spec.ident].next_start
    master._converge(clock.now)
    assert master._dead_workers["a"][0][0] == 77  # kept for the next try, one second later
    assert master.restarts[worker.spec.ident].next_start == clock.now + 1.0

    processes.fork_error = None
    restart(master, clock, "worker a#0")
    assert master._dead_workers == {}


def test_describe_exit_names_the_signal_and_suspects_the_oom_killer():
    assert describe_exit(exited(3)) == ("exit status 3", {"exit_status": 3})
    assert describe_exit(signal.SIGKILL)[0] == "killed by SIGKILL (out of memory?)"
    assert describe_exit(signal.SIGKILL, killed_by_us=True)[0] == "killed by SIGKILL"
    assert describe_exit(signal.SIGSEGV) == ("killed by SIGSEGV", {"signal": "SIGSEGV"})


# -- stop deadlines -----------------------------------------------------------------------


def test_drain_sends_term_then_quit_after_shutdown_timeout_then_sigkill(master, processes, clock):
    for c in master.children.values():
        boot(master, c)
    pids = sorted(master.children)
    start = clock.now
    send_signal(master, TERM)
    assert master._stopping == "drain"
    assert all(processes.sent(pid) == [TERM] for pid in pids)
    assert master.status_line() == "draining: 3 children left"
    assert master._wait(clock.now) == pytest.approx(3.0)

    master._enforce_deadlines(clock.advance(3.0 - 0.25))
    assert all(processes.sent(pid) == [TERM] for pid in pids)
    master._enforce_deadlines(clock.advance(0.25))
    master._enforce_deadlines(clock.now)
    assert all(processes.sent(pid) == [TERM, QUIT] for pid in pids)
    assert master._wait(clock.now) == pytest.approx(QUIT_GRACE)

    master._enforce_deadlines(clock.advance(QUIT_GRACE - 0.25))
    assert all(processes.sent(pid) == [TERM, QUIT] for pid in pids)
    master._enforce_deadlines(clock.advance(0.25))
    assert clock.now - start == 3.0 + QUIT_GRACE
    assert all(processes.sent(pid) == [TERM, QUIT, KILL] for pid in pids)
    master._enforce_deadlines(clock.advance(60.0))
    assert all(processes.sent(pid) == [TERM, QUIT, KILL] for pid in pids)


def test_children_that_exit_while_draining_are_not_restarted(master, processes, clock):
    send_signal(master, TERM)
    worker = master.children[min(master.children)]
    processes.exit(worker.pid, exited(0))
    master._reap()
    clock.advance(3.0)
    master._enforce_deadlines(clock.now)
    assert processes.sent(worker.pid) == [TERM]
    assert sum(r.total for r in master.restarts.values()) == 0
    assert master.status_line() == "draining: 2 children left"


def test_a_second_term_while_draining_stops_fast(master, processes, clock):
    send_signal(master, TERM)
    clock.advance(1.0)
    send_signal(master, signal.SIGINT)
    assert master._stopping == "fast"
    assert all(processes.sent(pid) == [TERM, QUIT] for pid in master.children)
    assert master.status_line() == "stopping: 3 children left"
    master._enforce_deadlines(clock.advance(FAST_STOP_GRACE - 0.25))
    assert all(processes.sent(pid) == [TERM, QUIT] for pid in master.children)
    master._enforce_deadlines(clock.advance(0.25))
    assert all(processes.sent(pid) == [TERM, QUIT, KILL] for pid in master.children)


def test_quit_stops_fast_and_sigkill_follows_after_fast_stop_grace(master, processes, clock):
    send_signal(master, QUIT)
    assert master._stopping == "fast"
    assert all(processes.sent(pid) == [QUIT] for pid in master.children)
    master._enforce_deadlines(clock.advance(FAST_STOP_GRACE - 0.25))
    assert all(processes.sent(pid) == [QUIT] for pid in master.children)
    master._enforce_deadlines(clock.advance(0.25))
    assert all(processes.sent(pid) == [QUIT, KILL] for pid in master.children)


def test_fast_stop_keeps_an_earlier_sigkill_deadline(master, processes, clock):
    send_signal(master, TERM)
    clock.advance(3.0 + QUIT_GRACE - 0.5)  # QUIT sent, SIGKILL due in 0.5 s
    master._enforce_deadlines(clock.now)
    send_signal(master, QUIT)
    master._enforce_deadlines(clock.advance(0.5))
    assert all(processes.sent(pid) == [TERM, QUIT, KILL] for pid in master.children)


def test_a_booted_child_silent_past_child_timeout_is_killed_and_restarted(master, processes, clock):
    worker, idle = child(master, "worker a#0"), child(master, "worker b#0")
    boot(master, worker)
    idle.last_heard = clock.now  # never booted: not watched
    assert master._wait(clock.now) == pytest.approx(supervisor.MAX_WAIT)
    master._enforce_deadlines(clock.advance(60.0))
    assert processes.sent(worker.pid) == []
    master._enforce_deadlines(clock.advance(0.25))
    assert processes.sent(worker.pid) == [KILL] and worker.killed
    master._enforce_deadlines(clock.advance(10.0))
    assert processes.sent(worker.pid) == [KILL]
    assert processes.sent(idle.pid) == []

    processes.exit(worker.pid, signal.SIGKILL)
    master._reap()
    restarts = master.restarts[worker.spec.ident]
    assert restarts.total == 1 and within(restarts.next_start - clock.now, 0.5)


def test_the_loop_drains_and_returns_once_every_child_is_gone(master, processes):
    processes.exit_on = {TERM}
    os.write(master._wake_w, bytes([TERM]))
    assert master._supervise() == EXIT_OK
    assert master.children == {} and processes.alive == set()


def test_only_http_starts_before_the_database_is_prepared(config_path, clock, processes):
    text = BASE + "http: {listen: '127.0.0.1:9'}\n"
    config_path.write_text(text)
    made = Supervisor(config.load(config_path), config_path=str(config_path), migrate=False)
    try:
        made._converge(clock.now)
        assert [c.spec.name for c in made.children.values()] == ["http"]
        assert made.health()["preparing"] == "starting"
        made.database_ready()
        made._converge(clock.now)
        assert len(made.children) == 4 and made.health()["preparing"] == ""
    finally:
        for c in made.children.values():
            c.close()
        made.selector.close()


# -- reload -------------------------------------------------------------------------------


def settings(text: str = BASE) -> config.Settings:
    return parse(text)


RELOADED = BASE.replace("a: {processes: 1, concurrency: 4}", "a: {processes: 1, concurrency: 3}")


def test_plan_reload_sorts_specs_into_replaced_started_retired_unchanged():
    old = settings()
    new = settings(
        BASE.replace("concurrency: 4", "concurrency: 3").replace(
            "b: {processes: 1, concurrency: 2}", "c: {processes: 1, concurrency: 1}"
        )
    )
    plan = plan_reload(old, specs_for(old), new)
    assert plan.replaced == ["worker a#0", "maintenance"]
    assert plan.started == ["worker c#0"]
    assert plan.retired == ["worker b#0"]
    assert plan.unchanged == 0
    assert plan.changes() == {
        "replaced": ["worker a#0", "maintenance"],
        "started": ["worker c#0"],
        "retired": ["worker b#0"],
    }
    assert [s.name for s in plan.specs] == ["worker a#0", "worker c#0", "maintenance"]
    assert not plan.database_changed and not plan.log_changed


def test_plan_reload_scaling_a_queue_keeps_maintenance_and_other_queues():
    old = settings()
    new = settings(BASE.replace("a: {processes: 1,", "a: {processes: 2,"))
    plan = plan_reload(old, specs_for(old), new)
    assert plan.started == ["worker a#1"]
    assert plan.replaced == ["worker a#0"]  # its queue's settings include the process count
    assert plan.retired == []
    assert plan.unchanged == 2
    old_specs = {s.name: s for s in specs_for(old)}
    assert plan.keeps(old_specs["maintenance"]) and plan.keeps(old_specs["worker b#0"])
    assert not plan.keeps(old_specs["worker a#0"])


def test_plan_reload_of_the_same_settings_changes_nothing():
    old = settings()
    plan = plan_reload(old, specs_for(old), settings())
    assert plan.replaced == plan.started == plan.retired == []
    assert plan.unchanged == len(plan.specs) == 3


def test_plan_reload_ignores_database_changes_until_the_next_restart():
    old = settings()
    new = settings(BASE.replace("127.0.0.1:1/unused", "127.0.0.1:2/other"))
    plan = plan_reload(old, specs_for(old), new)
    assert plan.database_changed
    assert plan.settings.database == old.database
    assert plan.replaced == plan.started == plan.retired == []


def test_plan_reload_replaces_every_child_when_the_log_settings_change():
    old = settings()
    new = settings(BASE + "log: {format: json, level: debug}\n")
    plan = plan_reload(old, specs_for(old), new)
    assert plan.log_changed
    assert plan.replaced == ["worker a#0", "worker b#0", "maintenance"]


def test_plan_reload_renews_restarts_of_changed_specs_and_drops_retired_ones():
    old = settings()
    current = {s.name: s for s in specs_for(old)}
    restarts = {s.ident: Restarts(total=2, crash_looping=True) for s in current.values()}
    new = settings(
        RELOADED.replace("b: {processes: 1, concurrency: 2}", "c: {processes: 1, concurrency: 1}")
    )
    plan = plan_reload(old, list(current.values()), new)
    after = plan.restarts(restarts)
    a0, b0, m = current["worker a#0"], current["worker b#0"], current["maintenance"]
    c0 = next(s for s in plan.specs if s.name == "worker c#0")
    assert after[a0.ident] == Restarts() and after[c0.ident] == Restarts()
    assert after[m.ident] == Restarts()  # maintenance sees the queue list: replaced too
    assert b0.ident not in after

    same = plan_reload(old, list(current.values()), settings())
    kept = same.restarts(restarts)
    assert all(kept[i] is restarts[i] for i in restarts)


def test_hup_stops_changed_children_with_the_old_timeout_and_starts_replacements(
    master, processes, clock, config_path
):
    for c in master.children.values():
        boot(master, c)
    a0, b0, maintenance = (child(master, n) for n in ("worker a#0", "worker b#0", "maintenance"))
    config_path.write_text(
        RELOADED.replace("shutdown_timeout: 3s", "shutdown_timeout: 7s").replace(
            "b: {processes: 1, concurrency: 2}", "c: {processes: 1, concurrency: 1}"
        )
    )
    send_signal(master, signal.SIGHUP)
    assert processes.sent(a0.pid) == processes.sent(b0.pid) == [TERM]
    assert processes.sent(maintenance.pid) == [TERM]
    assert a0.quit_at == pytest.approx(clock.now + 3.0)  # the settings it was started with
    names = sorted(c.spec.name for c in master.children.values() if c.stopping_since is None)
    assert names == ["maintenance", "worker a#0", "worker c#0"]
    assert child(master, "worker a#0").concurrency == 3
    assert master.settings.shutdown_timeout == 7.0
    assert master._stopping is None

    processes.exit(a0.pid, exited(0))
    master._reap()
    assert sum(r.total for r in master.restarts.values()) == 0


def test_hup_leaves_unchanged_children_alone(master, processes, config_path):
    config_path.write_text(BASE.replace("b: {processes: 1,", "b: {processes: 2,"))
    before = dict(master.children)
    send_signal(master, signal.SIGHUP)
    b0, a0 = child(master, "worker b#0"), child(master, "worker a#0")
    assert a0 is before[a0.pid] and processes.sent(a0.pid) == []
    assert b0.pid not in before  # replaced: its queue's settings changed
    assert child(master, "worker b#1").pid not in before
    assert child(master, "maintenance").pid in before


def test_hup_with_a_broken_config_changes_nothing_and_says_so(master, processes, config_path):
    config_path.write_text(BASE.replace("concurrency: 4", "concurrency: lots"))
    before = dict(master.children)
    send_signal(master, signal.SIGHUP)
    assert master.children == before and processes.signals == []
    assert master.status_line().endswith(
        "; last reload failed, running on the previous configuration"
    )
    config_path.write_text(BASE)
    send_signal(master, signal.SIGHUP)
    assert "reload failed" not in master.status_line()


def test_hup_whose_check_fails_keeps_the_old_config_and_logs_each_error(
    master, processes, config_path, caplog
):
    config_path.write_text(RELOADED)
    before = dict(master.children)
    os.write(master._wake_w, bytes([signal.SIGHUP]))
    master._handle_signals()
    assert master._checker is not None and master.children == before  # nothing until checked
    check_says(master, errors=["imports[1]: cannot import 'nope'", "cron.x.task: no task"])
    assert master.children == before and processes.signals == []
    assert master.settings.queues["a"].concurrency == 4
    assert "reload: imports[1]: cannot import 'nope'" in caplog.text
    assert "reload: cron.x.task: no task" in caplog.text
    assert master.status_line().endswith("running on the previous configuration")


def test_hup_while_draining_is_ignored(master, processes, config_path):
    send_signal(master, TERM)
    config_path.write_text(RELOADED)
    send_signal(master, signal.SIGHUP)
    assert master.settings.queues["a"].concurrency == 4
    assert all(processes.sent(pid) == [TERM] for pid in master.children)


# -- status line and health ---------------------------------------------------------------

SPECS = [ChildSpec(WORKER, "a", 0), ChildSpec(WORKER, "a", 1), ChildSpec(MAINTENANCE)]


def children(*, busy: tuple[int, int] = (1, 3), leader: bool | None = True) -> list[Child]:
    made = []
    for pid, spec in enumerate(SPECS, start=100):
        c = Child(spec, pid, -1)
        if spec.kind == WORKER:
            c.busy, c.concurrency = busy[spec.index], 4
        else:
            c.leader = leader
        made.append(c)
    return made


def line(kids: list[Child], restarts=None, **kw: object) -> str:
    kw.setdefault("stopping", None)
    kw.setdefault("reload_failed", False)
    kw.setdefault("now", time.monotonic())
    return report.status_line(kids, SPECS, restarts or {}, **kw)  # type: ignore[arg-type]


def test_status_line_counts_workers_busy_slots_leadership_and_restarts():
    assert line(children()) == "2 workers, 4/8 slots busy, leader: yes, 0 restarts"
    assert line(children(leader=False)) == "2 workers, 4/8 slots busy, leader: no, 0 restarts"
    assert line(children(leader=None)[1:]) == "1 worker, 3/4 slots busy, leader: no, 0 restarts"
    restarts = {SPECS[0].ident: Restarts(total=2), SPECS[2].ident: Restarts(total=1)}
    assert line(children(), restarts).endswith(", 3 restarts")


def test_a_silent_leader_is_not_reported_as_leading():
    kids = children()
    heard = kids[-1].last_heard
    assert line(kids, now=heard + LEADER_SILENCE - 0.1).count("leader: yes") == 1
    assert "leader: no" in line(kids, now=heard + LEADER_SILENCE)


def test_status_line_leaves_out_stopping_children_and_names_crash_loops():
    kids = children()
    kids[0].stopping_since = 1.0
    restarts = {SPECS[1].ident: Restarts(crash_looping=True)}
    assert line(kids, restarts) == (
        "1 worker, 3/4 slots busy, leader: yes, 0 restarts; crash loop: worker a#1"
    )
    assert line(kids, reload_failed=True).endswith(
        "0 restarts; last reload failed, running on the previous configuration"
    )


def test_status_line_while_stopping_counts_every_child_left():
    kids = children()
    kids[0].stopping_since = 1.0
    assert line(kids, stopping="drain") == "draining: 3 children left"
    assert line(kids[:1], stopping="fast") == "stopping: 1 children left"


def test_health_has_one_entry_per_spec_and_none_pid_while_waiting():
    kids = children()
    kids[1].stopping_since = 1.0
    kids[0].booted_at = 5.0
    restarts = {SPECS[1].ident: Restarts(total=4, crash_looping=True)}
    message = report.health(
        kids,
        SPECS,
        restarts,
        ready=True,
        stopping=False,
        status="s",
        master_alive_at=12.5,
        now=time.monotonic(),
    )
    assert message["kind"] == "health" and message["master_alive_at"] == 12.5
    assert (message["ready"], message["stopping"], message["status"]) == (True, False, "s")
    a0, a1, m = (message["children"][n] for n in ("worker a#0", "worker a#1", "maintenance"))
    assert a0 == {
        "role": "worker",
        "queue": "a",
        "index": 0,
        "pid": 100,
        "booted": True,
        "started_at": kids[0].started_wall,
        "busy": 1,
        "concurrency": 4,
        "leader": None,
        "restarts": 0,
        "crash_looping": False,
        "crash_loop": None,
        "last_exit": None,
    }
    assert a1["index"] == 1
    assert a1["pid"] is None and a1["busy"] == 0 and a1["restarts"] == 4 and a1["crash_looping"]
    assert m["leader"] is True and m["booted"] is False


def test_supervisor_health_uses_the_master_clock(master, clock):
    message = master.health()
    assert message["master_alive_at"] == clock.time()
    assert message["status"] == master.status_line()
    assert set(message["children"]) == {"worker a#0", "worker b#0", "maintenance"}


# -- database preparation -----------------------------------------------------------------


def test_prepare_waits_with_backoff_and_says_why_until_the_database_answers():
    slept: list[float] = []
    said: list[dict] = []

    class Stop(Exception):
        pass

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise Stop

    with pytest.raises(Stop):  # port 1: connection refused, forever
        prepare(settings().database.url, "jobqd", migrate=True, report=said.append, sleep=sleep)
    assert all(within(s, e) for s, e in zip(slept, [1.0, 2.0, 4.0], strict=True))
    assert [m["kind"] for m in said] == ["progress"] * 3
    assert all(m["state"].startswith("waiting for the database: cannot connect") for m in said)


def crash_looping(master, role: str, queue: str) -> float:
    """The master's jobqd_child_crash_looping sample for (role, queue)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = master.metric_store.exposition()[0].decode()
    [value] = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "jobqd_child_crash_looping"
        and sample.labels == {"role": role, "queue": queue}
    ]
    return value


def test_deaths_after_boot_in_the_window_are_a_crash_loop_that_ages_out(master, processes, clock):
    from jobqd.daemon.children import CRASH_LOOP_WINDOW

    for _ in range(CRASH_LOOP_AFTER):
        worker = restart(master, clock, "worker a#0")
        boot(master, worker, process_id=7)
        clock.advance(1.0)
        processes.exit(worker.pid, exited(1))
        master._reap()
    restarts = master.restarts[worker.spec.ident]
    assert restarts.crash_looping and restarts.last_exit == "exit status 1"
    master._check_crash_loops(clock.now)
    assert crash_looping(master, "worker", "a") == 1
    health = master.health()["children"]["worker a#0"]
    assert health["crash_looping"] and "after it had booted" in health["crash_loop"]

    boot(master, restart(master, clock, "worker a#0"))
    assert restarts.crash_looping  # booting again does not end a loop of deaths after boot
    clock.advance(CRASH_LOOP_WINDOW)
    master._check_crash_loops(clock.now)
    assert not restarts.crash_looping
    assert crash_looping(master, "worker", "a") == 0


def test_a_worker_killed_for_silence_hands_on_that_reason(master, processes, clock):
    worker = child(master, "worker a#0")
    boot(master, worker, process_id=9)
    clock.advance(master.settings.child_timeout + 1)
    master._enforce_deadlines(clock.now)
    assert processes.sent(worker.pid) == [KILL]
    processes.exit(worker.pid, KILL)
    master._reap()
    assert master._dead_workers == {"a": [(9, "killed after child_timeout")]}


def test_a_reload_that_moves_http_listen_rebinds_and_a_taken_address_keeps_the_old(
    master, processes, config_path
):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        first, busy = free_port(), taken.getsockname()[1]
        config_path.write_text(BASE + f"http: {{listen: '127.0.0.1:{first}'}}\n")
        send_signal(master, signal.SIGHUP)
        assert master.listener.getsockname()[1] == first
        assert child(master, "http").spec.kind == "http"
        config_path.write_text(BASE + f"http: {{listen: '127.0.0.1:{busy}'}}\n")
        send_signal(master, signal.SIGHUP)
        assert master.listener.getsockname()[1] == first  # still the old address
        assert master.settings.http.listen == f"127.0.0.1:{first}"
        assert "last reload failed" in master.status_line()
    master.listener.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- rolling (USR2) -------------------------------------------------------------------------

ROLL_BASE = BASE.replace("a: {processes: 1, concurrency: 4}", "a: {processes: 2, concurrency: 4}")


@pytest.fixture
def titles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The master's process titles, recorded instead of set."""
    seen: list[str] = []
    monkeypatch.setattr(supervisor, "set_title", seen.append)
    return seen


@pytest.fixture
def rolling(config_path, clock, processes, titles):
    """A master with queue a on two processes and b on one, every child booted."""
    config_path.write_text(ROLL_BASE)
    made = Supervisor(config.load(config_path), config_path=str(config_path), migrate=False)
    made.database_ready()
    made._converge(clock.now)
    for c in made.children.values():
        boot(made, c)
    yield made
    for c in made.children.values():
        c.close()
    made.selector.close()
    os.close(made._wake_r)
    os.close(made._wake_w)


def roll(master: Supervisor, *, errors: list[str] | None = None, version: str | None = "") -> None:
    """SIGUSR2, its config check played as reporting `errors` with the installed `version`
    (the master's own unless given), then one loop turn."""
    os.write(master._wake_w, bytes([signal.SIGUSR2]))
    master._handle_signals()
    checker = master._checker
    assert checker is not None
    found = master.version if version == "" else version
    checker.messages.append(
        {"kind": "verdict", "errors": errors or [], "warnings": [], "version": found}
    )
    del master.helpers[checker.pid]
    master._helper_exited(checker, exited(0))
    master._turn(supervisor.time.monotonic())


def serving(master: Supervisor, name: str) -> list[Child]:
    """The children of spec `name` not being stopped, oldest first."""
    found = [c for c in master.children.values() if c.spec.name == name]
    return sorted((c for c in found if c.stopping_since is None), key=lambda c: c.pid)


def booting(master: Supervisor) -> list[Child]:
    return [c for c in master.children.values() if c.replaces is not None]


def test_batch_size_is_a_quarter_of_a_queues_processes_and_at_least_one():
    assert [roll_module.batch_size(n) for n in (1, 2, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]


def test_plan_roll_goes_queue_by_queue_in_batches_and_only_through_the_given_workers():
    specs = specs_for(settings(BASE.replace("a: {processes: 1,", "a: {processes: 8,")))
    every = [s.ident for s in specs]
    steps = roll_module.plan_roll(specs, every)
    names = [[roll_module.ident_name(i) for i in step] for step in steps]
    assert names == [
        ["worker a#0", "worker a#1"],
        ["worker a#2", "worker a#3"],
        ["worker a#4", "worker a#5"],
        ["worker a#6", "worker a#7"],
        ["worker b#0"],
    ]
    some = [i for i in every if i[2] in (1, 2, 7) and i[1] == "a"]
    assert roll_module.plan_roll(specs, some) == [some[:2], some[2:]]
    assert roll_module.plan_roll(specs, []) == []


def test_usr2_replaces_each_worker_beside_itself_and_drains_the_old_once_it_booted(
    rolling, processes, clock, titles
):
    master = rolling
    (a0,), (a1,), (b0,) = (serving(master, n) for n in ("worker a#0", "worker a#1", "worker b#0"))
    maintenance = serving(master, "maintenance")[0]
    roll(master)
    assert titles[-1] == "master roll 1 rolling 0/3 worker a#0"
    (new,) = booting(master)
    assert new.spec.name == "worker a#0" and new.replaces == a0.pid and new.generation == 1
    assert processes.signals == []  # nothing drains before its replacement has booted
    assert "; roll 1 rolling 0/3 worker a#0" in master.status_line()
    assert master.status_line().startswith("3 workers, ")  # the replacement is not counted yet

    clock.advance(1)
    boot(master, new)
    master._turn(clock.now)
    assert processes.sent(a0.pid) == [TERM] and a0.quit_at == clock.now + 3.0
    (second,) = booting(master)
    assert second.spec.name == "worker a#1" and processes.sent(a1.pid) == []
    boot(master, second)
    master._turn(clock.now)
    (third,) = booting(master)
    assert third.spec.name == "worker b#0" and processes.sent(a1.pid) == [TERM]
    boot(master, third)
    master._turn(clock.now)

    assert processes.sent(b0.pid) == [TERM] and booting(master) == []
    assert processes.sent(maintenance.pid) == []  # it runs no task code: not replaced
    assert master.roll.state == "done" and master.roll.replaced == 3
    assert titles[-1] == "master roll 1 done 3/3"
    assert "roll" not in master.status_line()
    assert master.health()["roll"]["state"] == "done"
    workers = [c for c in master.children.values() if c.stopping_since is None]
    assert {c.generation for c in workers if c.spec.kind == WORKER} == {1}

    for old in (a0, a1, b0):  # the old ones drain and exit: none is restarted
        processes.exit(old.pid, exited(0))
    master._reap()
    master._turn(clock.now)
    assert len(master.children) == 4 and sum(r.total for r in master.restarts.values()) == 0


def test_a_replacement_that_exits_before_booting_stops_the_roll_and_keeps_the_old_workers(
    rolling, processes, clock, titles, caplog
):
    master = rolling
    olds = {c.pid for c in master.children.values()}
    roll(master)
    (new,) = booting(master)
    processes.exit(new.pid, exited(1))
    master._reap()
    master._turn(clock.now)

    assert master.roll.state == "failed" and master.roll.where == "worker a#0"
    assert processes.signals == [] and {c.pid for c in master.children.values()} == olds
    assert titles[-1] == "master roll 1 failed 0/3 worker a#0"
    assert master.status_line().endswith("; roll 1 failed 0/3 worker a#0")
    assert (
        "roll 1 stopped: the replacement for worker a#0 exited before it booted: exit status 1"
        in caplog.text
    )
    assert "worker a#0 and the 2 other worker(s) not yet replaced keep running" in caplog.text
    clock.advance(120)  # no restart of anything, no further replacement
    master._turn(clock.now)
    assert {c.pid for c in master.children.values()} == olds
    assert sum(r.total for r in master.restarts.values()) == 0
    assert master.health()["roll"]["error"].startswith("the replacement for worker a#0 exited")

    roll(master)  # fixed: the next roll starts over with every worker still on old code
    assert master.roll.number == 2 and master.roll.total == 3
    assert booting(master)[0].spec.name == "worker a#0"


def test_a_replacement_that_does_not_boot_in_time_is_stopped_and_the_roll_fails(
    rolling, processes, clock
):
    master = rolling
    roll(master)
    (new,) = booting(master)
    clock.advance(roll_module.BOOT_TIMEOUT - 1)
    master._turn(clock.now)
    assert master.roll.state == "rolling" and processes.signals == []
    clock.advance(1)
    master._turn(clock.now)
    assert master.roll.state == "failed"
    assert master.roll.error == "the replacement for worker a#0 did not boot within 60s"
    assert processes.signals == [(new.pid, TERM)]
    processes.exit(new.pid, exited(0))
    master._reap()
    master._turn(clock.now)
    assert [c.spec.name for c in serving(master, "worker a#0")] == ["worker a#0"]


def test_a_roll_whose_check_fails_changes_nothing(rolling, processes, titles, caplog):
    master = rolling
    before = dict(master.children)
    roll(master, errors=["imports[0]: cannot import 'tasks': SyntaxError"])
    assert master.children == before and processes.signals == []
    assert master.roll.state == "failed" and master.roll.where == "config"
    assert titles[-1] == "master roll 1 failed 0/0 config"
    assert "reload: imports[0]: cannot import 'tasks'" in caplog.text


def test_a_roll_refuses_a_jobqd_that_changed_on_disk(rolling, processes, titles, caplog):
    master = rolling
    before = dict(master.children)
    roll(master, version="99.0")
    assert master.children == before and processes.signals == []
    assert master.roll.where == "version" and "restart the daemon" in caplog.text


def test_usr2_during_a_roll_is_ignored(rolling, processes, caplog):
    master = rolling
    roll(master)
    os.write(master._wake_w, bytes([signal.SIGUSR2]))
    master._handle_signals()
    assert master._checker is None and master.roll.number == 1
    assert "roll 1 is still under way (rolling 0/3 worker a#0): SIGUSR2 ignored" in caplog.text


def test_a_roll_with_changed_queue_settings_replaces_those_workers_in_their_turn(
    rolling, processes, clock, config_path
):
    master = rolling
    (b0,) = serving(master, "worker b#0")
    maintenance = serving(master, "maintenance")[0]
    config_path.write_text(ROLL_BASE.replace("concurrency: 2}", "concurrency: 5, lease: 40s}"))
    roll(master)
    assert processes.sent(b0.pid) == []  # not stopped by the reload: the roll replaces it
    assert processes.sent(maintenance.pid) == [TERM]  # sees the queues: replaced as by HUP
    for _ in range(2):
        boot(master, booting(master)[0])
        master._turn(clock.now)
    (new_b0,) = booting(master)
    assert new_b0.spec.name == "worker b#0" and new_b0.concurrency == 5
    assert processes.sent(b0.pid) == []
    boot(master, new_b0)
    master._turn(clock.now)
    assert processes.sent(b0.pid) == [TERM] and master.roll.state == "done"


def test_an_old_worker_that_dies_during_the_roll_is_not_restarted_beside_its_replacement(
    rolling, processes, clock
):
    master = rolling
    (a0,) = serving(master, "worker a#0")
    roll(master)
    (new,) = booting(master)
    processes.exit(a0.pid, exited(1))
    master._reap()
    clock.advance(5)  # past its restart delay
    master._turn(clock.now)
    assert serving(master, "worker a#0") == [new]
    boot(master, new)
    master._turn(clock.now)
    assert master.roll.replaced == 1 and booting(master)[0].spec.name == "worker a#1"


def test_term_during_a_roll_ends_it_and_drains_every_child(rolling, processes, titles):
    master = rolling
    roll(master)
    (new,) = booting(master)
    os.write(master._wake_w, bytes([TERM]))
    master._handle_signals()
    assert master.roll.state == "failed" and master.roll.where == "stopping"
    assert TERM in processes.sent(new.pid)


def test_the_title_of_each_roll_state_reads_back():
    r = roll_module.Roll(4, started_at=0.0)
    states = [r.title()]
    r.begin([[("worker", "a", 0)], [("worker", "b", 0)]])
    r.replacing[("worker", "a", 0)] = roll_module.Replacement(1, 2, 0.0)
    states.append(r.title())
    r.replacing.clear()
    r.replaced = 1
    r.fail("worker b#0", "it exited")
    states.append(r.title())
    assert states == [
        "master roll 4 checking",
        "master roll 4 rolling 0/2 worker a#0",
        "master roll 4 failed 1/2 worker b#0",
    ]
    parsed = [roll_module.parse_title("jobqd: " + t) for t in states]
    assert [(p.number, p.state, p.replaced, p.total, p.where) for p in parsed] == [
        (4, "checking", 0, 0, ""),
        (4, "rolling", 0, 2, "worker a#0"),
        (4, "failed", 1, 2, "worker b#0"),
    ]
    assert roll_module.parse_title("jobqd: master") == roll_module.TitleState()
    assert roll_module.parse_title("jobqd: worker a#0 0/4") is None

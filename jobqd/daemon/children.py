"""What the master knows about its children: the specs it wants running and the processes it has.

The config expands into a flat list of `ChildSpec`s (one per worker process, one maintenance,
one http when enabled). The master only knows how to start, watch and replace specs, so a reload
is a diff of two spec lists: a spec whose `key` (the settings that child runs with) changed is
replaced, one that disappeared is retired, a new one is started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from jobqd.backoff import Backoff
from jobqd.config.settings import FrozenDict, Settings
from jobqd.daemon.ipc import Receiver

WORKER = "worker"
MAINTENANCE = "maintenance"
HTTP = "http"

CRASH_LOOP_AFTER = 3
"""Exits that make a spec crash-looping: this many in a row before `booted`, or this many
within `CRASH_LOOP_WINDOW` of children that had booted (a job that kills its process)."""

CRASH_LOOP_WINDOW = 60.0
"""Seconds over which exits after boot are counted towards a crash loop."""

LEADER_SILENCE = 3.0
"""A maintenance child silent this long is no longer reported as the leader."""

STABLE_AFTER = 10.0
"""A child that stayed booted this long has its restart backoff reset."""

RESTART_BACKOFF = Backoff(kind="exponential", base=0.5, cap=30.0, jitter=0.1)
"""Delay before restarting a child that exited on its own: 0.5 s, 1 s, 2 s ... 30 s."""

Ident = tuple[str, str | None, int]
"""A spec's identity across restarts and reloads: kind, queue, index."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One process the master wants: its kind, queue and index (its identity across restarts
    and reloads) and `key`, the part of the settings it runs with (equal keys: same child)."""

    kind: str
    queue: str | None = None
    index: int = 0
    key: Any = None

    @property
    def ident(self) -> Ident:
        return (self.kind, self.queue, self.index)

    @property
    def name(self) -> str:
        """`worker emails#1`, `maintenance`, `http`: the title and the name in logs."""
        return f"{self.kind} {self.queue}#{self.index}" if self.kind == WORKER else self.kind


def _shared(settings: Settings) -> tuple[Any, ...]:
    """Settings every child depends on: replacing them replaces every child."""
    return (settings.database, settings.log, settings.imports, settings.pythonpath, settings.tasks)


def _without_process_counts(settings: Settings) -> Settings:
    """The settings with each queue's process count and concurrency neutral: scaling workers
    must not restart the maintenance child."""
    queues = FrozenDict(
        {
            name: dataclasses.replace(queue, processes=1, concurrency=1)
            for name, queue in settings.queues.items()
        }
    )
    return dataclasses.replace(settings, queues=queues)


def specs_for(settings: Settings) -> list[ChildSpec]:
    """Every child `settings` asks for, workers first, in a stable order."""
    shared = _shared(settings)
    specs = []
    for queue, queue_settings in settings.queues.items():
        key = (shared, queue_settings, settings.shutdown_timeout)
        specs += [ChildSpec(WORKER, queue, n, key) for n in range(queue_settings.processes)]
    specs.append(ChildSpec(MAINTENANCE, key=_without_process_counts(settings)))
    if settings.http.listen:
        specs.append(ChildSpec(HTTP, key=(shared, settings.http, settings.shutdown_timeout)))
    return specs


class Feed:
    """The master's end of the pipe to the http child: newline-delimited JSON that never blocks
    the master. While an earlier message is still half written (the child is slow or stuck),
    new messages are dropped rather than queued; the next one carries the whole state anyway."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = b""

    def send(self, *messages: dict[str, Any]) -> bool:
        self.flush()
        if self._pending:
            return False
        self._pending = b"".join(
            json.dumps(m, separators=(",", ":"), default=str).encode() + b"\n" for m in messages
        )
        self.flush()
        return True

    def flush(self) -> None:
        while self._pending:
            try:
                written = os.write(self.fd, self._pending)
            except BlockingIOError:
                return
            except OSError:  # the child is gone; its exit is handled when it is reaped
                self._pending = b""
                return
            self._pending = self._pending[written:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(eq=False)
class Child:
    """One forked process, what the master heard from it, and its stop deadlines."""

    spec: ChildSpec
    pid: int
    fd: int  # read end of the child's message pipe
    feed: Feed | None = None  # http child only
    started_wall: float = field(default_factory=time.time)
    receiver: Receiver = field(init=False)
    listening: bool = True  # its pipe is registered in the master's selector
    booted_at: float | None = None
    last_heard: float = field(default_factory=time.monotonic)  # its last message
    process_id: int | None = None  # its row in jobqd.processes, from `booted`
    busy: int = 0
    concurrency: int = 0
    leader: bool | None = None  # maintenance only
    stopping_since: float | None = None  # TERM or QUIT sent: it is not restarted
    quit_at: float | None = None  # when it gets QUIT if still running
    kill_at: float | None = None  # when it gets SIGKILL if still running
    quit_sent: bool = False
    killed: bool = False
    kill_reason: str | None = None  # why the master killed it, when not to stop it
    generation: int = 0  # the roll in force when it started (jobqd.daemon.roll)
    replaces: int | None = None  # a roll's replacement until it boots: the pid it replaces

    def __post_init__(self) -> None:
        self.receiver = Receiver(self.fd)

    def leads(self, now: float) -> bool:
        """Whether it said it leads and has spoken within LEADER_SILENCE: a frozen leader's
        last word is stale (the database ends its lock session after leader_timeout)."""
        return bool(self.leader) and now - self.last_heard < LEADER_SILENCE

    @property
    def booted(self) -> bool:
        return self.booted_at is not None

    @property
    def source(self) -> str:
        """Its name in the master's metrics registry: unique per process."""
        return f"{self.spec.name}[{self.pid}]"

    def fields(self) -> dict[str, Any]:
        """Log fields naming this child."""
        fields: dict[str, Any] = {"child": self.spec.name, "child_role": self.spec.kind}
        fields["child_pid"] = self.pid
        if self.spec.queue is not None:
            fields["queue"] = self.spec.queue
        return fields

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self.feed is not None:
            self.feed.close()
            self.feed = None


@dataclass
class Restarts:
    """Restart bookkeeping of one spec identity, kept across the processes that fill it."""

    failures: int = 0  # unplanned exits since the last stable run
    boot_failures: int = 0  # exits before `booted`, in a row
    total: int = 0  # restarts after unplanned exits, ever
    next_start: float = 0.0  # monotonic time before which it is not restarted
    crash_looping: bool = False  # as of the last `refresh`
    deaths: list[float] = field(default_factory=list)  # exits after boot, in the window
    last_exit: str | None = None  # how the last unplanned exit went, in words

    def exited(self, child: Child, now: float, how: str) -> float:
        """Record an unplanned exit of `child` (`how`: describe_exit's words); returns the
        delay before the next start. A boot-failure loop is retried at the cap; a child that
        dies after booting keeps its growing backoff, so a poison job is retried soon."""
        if child.booted_at is not None and now - child.booted_at >= STABLE_AFTER:
            self.failures = 0
        self.failures += 1
        self.boot_failures = 0 if child.booted else self.boot_failures + 1
        if child.booted:
            self.deaths.append(now)
        self.last_exit = how
        self.refresh(now)
        boot_loop = self.boot_failures >= CRASH_LOOP_AFTER
        delay = RESTART_BACKOFF.cap if boot_loop else RESTART_BACKOFF.delay(self.failures)
        self.next_start = now + delay
        return delay

    def refresh(self, now: float) -> bool:
        """Recompute `crash_looping` at `now` (deaths age out of the window); True if it
        changed."""
        self.deaths = [t for t in self.deaths if now - t < CRASH_LOOP_WINDOW]
        looping = self.boot_failures >= CRASH_LOOP_AFTER or len(self.deaths) >= CRASH_LOOP_AFTER
        changed = looping != self.crash_looping
        self.crash_looping = looping
        return changed

    def describe(self) -> str:
        """Why it counts as crash-looping, for the log line and status."""
        if self.boot_failures >= CRASH_LOOP_AFTER:
            return f"it exited {self.boot_failures} times in a row before it booted"
        return f"it exited {len(self.deaths)} times in {CRASH_LOOP_WINDOW:.0f}s after it had booted"

    def booted(self) -> None:
        """A child of this spec booted: a boot-failure loop is over (deaths after boot still
        count until they age out of the window)."""
        self.boot_failures = 0
        self.crash_looping = len(self.deaths) >= CRASH_LOOP_AFTER

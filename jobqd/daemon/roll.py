"""Rolling code upgrades: replace every worker, a few at a time, so that new task code rolls
out while every queue keeps claiming.

A roll (SIGUSR2, `jobqctl roll`) checks and applies the config file as a HUP does, then
replaces every worker that runs code older than the roll, one queue at a time and at most
`batch_size` of a queue's processes at once (a quarter, as Kubernetes' default maxSurge).
Each replacement starts beside the worker it replaces: only once it has booted is the old one
told to drain (TERM, as a stop does), and the roll moves on; so a queue never has fewer
claiming workers than before. A replacement that exits before it boots, or does not boot
within `BOOT_TIMEOUT`, stops the roll: the worker it was to replace and every one not yet
replaced keep running the code they have.

Maintenance and http run no application code (cron enqueues by task name; the reaper reads
task policies from the database), so a roll replaces them only when the new config changes
their settings, exactly as a HUP would.

Each roll has a number; every child the master starts is stamped with the number of the roll
in force (its `generation`, 0 before any roll), which its jobqd.processes row carries, so
`jobqctl status` sees a node whose workers run two generations. The master's process title
says how its last roll went, in a form `parse_title` reads back: that is how `jobqctl roll`,
on the same host, follows a roll of a master that has no database connection.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jobqd.daemon.children import WORKER, ChildSpec, Ident

BOOT_TIMEOUT = 60.0
"""Seconds a replacement may take to boot before the roll gives up on it."""
SURGE = 0.25
"""The share of a queue's processes replaced at once (at least one)."""

CHECKING, ROLLING, DONE, FAILED = "checking", "rolling", "done", "failed"


def batch_size(processes: int) -> int:
    """How many of a queue's `processes` are replaced at once."""
    return max(1, math.ceil(processes * SURGE))


def plan_roll(specs: Iterable[ChildSpec], idents: Iterable[Ident]) -> list[list[Ident]]:
    """The steps of a roll: the worker `idents` to replace, grouped by queue in spec order,
    each queue cut into batches of `batch_size` of its processes. A step never mixes queues."""
    to_replace = set(idents)
    queues: dict[str | None, list[Ident]] = {}
    for spec in specs:
        if spec.kind == WORKER:
            queues.setdefault(spec.queue, []).append(spec.ident)
    steps = []
    for queue_idents in queues.values():
        size = batch_size(len(queue_idents))
        wanted = [ident for ident in queue_idents if ident in to_replace]
        steps += [wanted[n : n + size] for n in range(0, len(wanted), size)]
    return steps


def ident_name(ident: Ident) -> str:
    kind, queue, index = ident
    return ChildSpec(kind, queue, index).name


@dataclass
class Replacement:
    """One worker being replaced: the process it replaces and the one booting in its place."""

    old_pid: int
    new_pid: int
    started_at: float


@dataclass
class Roll:
    """One roll's progress, from its request to its end: what the master has done so far, for
    its logs, STATUS=, process title and health report."""

    number: int
    started_at: float
    state: str = CHECKING
    steps: list[list[Ident]] = field(default_factory=list)
    step: int = 0  # the next step to start
    replacing: dict[Ident, Replacement] = field(default_factory=dict)
    replaced: int = 0
    error: str | None = None  # why it failed, in a sentence
    where: str = ""  # the child it failed at or is booting, or what failed ("config")

    @property
    def total(self) -> int:
        return sum(len(step) for step in self.steps)

    @property
    def active(self) -> bool:
        return self.state in (CHECKING, ROLLING)

    def begin(self, steps: list[list[Ident]]) -> None:
        self.state, self.steps = ROLLING, steps

    def fail(self, where: str, error: str) -> None:
        self.state, self.where, self.error = FAILED, where, error

    def finish(self) -> None:
        self.state, self.where = DONE, ""

    def next_step(self) -> list[Ident] | None:
        if self.step >= len(self.steps):
            return None
        self.step += 1
        return self.steps[self.step - 1]

    def progress(self) -> str:
        """`rolling 2/5 worker b#0`: the state, replaced of total, and where it is."""
        text = self.state
        if self.state != CHECKING:
            text += f" {self.replaced}/{self.total}"
        where = ", ".join(ident_name(i) for i in self.replacing) or self.where
        return f"{text} {where}" if where and self.state != DONE else text

    def title(self) -> str:
        """The master's process title while and after this roll (see `parse_title`)."""
        return f"master roll {self.number} {self.progress()}"

    def document(self) -> dict[str, Any]:
        """The roll in the health report (and from there in the http child's row)."""
        return {
            "number": self.number,
            "state": self.state,
            "replaced": self.replaced,
            "total": self.total,
            "replacing": [ident_name(i) for i in self.replacing],
            "where": self.where or None,
            "error": self.error,
        }


@dataclass(frozen=True)
class TitleState:
    """A master's last roll as its process title says: number 0 and state "" before any."""

    number: int = 0
    state: str = ""
    replaced: int = 0
    total: int = 0
    where: str = ""


_TITLE = re.compile(
    r"^jobqd: master roll (?P<number>\d+) (?P<state>checking|rolling|done|failed)"
    r"(?: (?P<replaced>\d+)/(?P<total>\d+))?(?: (?P<where>.+))?$"
)


def parse_title(title: str) -> TitleState | None:
    """What `Roll.title()` wrote (after the `jobqd: ` prefix), or TitleState() for a master
    that never rolled; None when `title` is not a jobqd master's."""
    title = title.strip()
    if title == "jobqd: master":
        return TitleState()
    found = _TITLE.match(title)
    if found is None:
        return None
    return TitleState(
        number=int(found["number"]),
        state=found["state"],
        replaced=int(found["replaced"] or 0),
        total=int(found["total"] or 0),
        where=found["where"] or "",
    )

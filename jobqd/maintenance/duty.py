"""The shape every leader duty has: when it is next due, and one run on the leader session.

The maintenance loop holds a list of duties. When it becomes the leader it calls `start` on
each; on every tick it runs the duties that are due, in order, re-proving leadership before
each, and sets each one's next due time from the `Result` of its run. It sleeps until the
earliest of those. A duty owns its settings slice, its constants and its cadence; adding one
is a module here with a `Duty` subclass, and a line in the loop's list.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import psycopg

from jobqd.config.settings import Settings
from jobqd.observe.metrics import JobqdMetrics


@dataclass(frozen=True)
class Result:
    """What one run did, by kind (say {"queued": 2, "dead": 1}), and how many seconds after
    the run's start the duty is due again."""

    counts: Mapping[str, int]
    again_in: float

    def __bool__(self) -> bool:
        return any(self.counts.values())


class Duty(ABC):
    """One periodic duty of the leader. `next_due` is on the monotonic clock; infinity means
    not due at all (not leading yet, or nothing to do with this config)."""

    name: ClassVar[str]
    first_delay: ClassVar[float] = 0.0  # seconds after taking over until the first run

    def __init__(self, settings: Settings, metrics: JobqdMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.next_due = math.inf

    @property
    def enabled(self) -> bool:
        """False when this config gives the duty nothing to do: then it is never due."""
        return True

    def start(self, now: float) -> None:
        """Taking over as leader: the first run is due `first_delay` seconds from `now`."""
        self.next_due = now + self.first_delay if self.enabled else math.inf

    def due(self, now: float) -> bool:
        return now >= self.next_due

    def run_due(self, conn: psycopg.Connection, now: float) -> Result:
        """Run once (the loop checked `due`) and book the next run from `now`, the tick."""
        result = self.run(conn)
        self.next_due = now + result.again_in
        return result

    @abstractmethod
    def run(self, conn: psycopg.Connection) -> Result:
        """One pass on `conn`, the leader session (autocommit); logs a line when it did
        something. A database error propagates: the caller steps down."""

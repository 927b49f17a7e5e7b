"""When this worker's leases end by its own clock, so it can give a job up before the
database's expiry does (local clocks may end a lease early, never late).

A lease runs from the moment its claim or renewal was *sent*: the database sets the expiry
later than that, so counting from the send errs early. One renewal covers every job held
when it was sent, and a job claimed since then holds a later lease than that renewal's, so
one instant bounds them all: the send time of the last renewal that came back (or of the
first claim, before any renewal). Early for the newer claims, never late for any, and one
float on the hot path rather than a record per job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from jobqd.tasks import Job


class LocalLeases:
    def __init__(
        self, lease: float, margin: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lease = lease
        self.margin = margin  # how much earlier than the database this worker gives up
        self._clock = clock
        self._since: float | None = None  # the oldest send any held lease counts from

    def claimed(self, sent_at: float) -> None:
        """A claim sent at `sent_at` returned jobs."""
        if self._since is None:
            self._since = sent_at

    def renewed(self, sent_at: float) -> None:
        """A renewal of every held lease, sent at `sent_at`, came back."""
        self._since = sent_at

    def overdue(self) -> bool:
        """Whether the held leases may have ended by now, by this clock."""
        since = self._since
        return since is not None and since + self.lease - self.margin <= self._clock()

    def expired(self, jobs: Iterable[Job]) -> list[Job]:
        """Of `jobs` (held since their claim), those whose lease has ended here."""
        return list(jobs) if self.overdue() else []

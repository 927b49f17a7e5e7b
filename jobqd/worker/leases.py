"""When this worker's leases end by its own clock, so it can give a job up before the
database's expiry does (local clocks may end a lease early, never late).

A lease runs from the moment its claim or renewal was *sent*: the database sets the expiry
later than that, so counting from the send errs early. One renewal covers every job held
when it was sent, so the bookkeeping is per statement, not per job: the send time of the last
renewal that came back, and the claims sent since then (each with its job ids).
"""

from __future__ import annotations

import threading
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
        self._lock = threading.Lock()
        self._renewed_at = float("-inf")
        self._claims: list[tuple[float, frozenset[int]]] = []

    def claimed(self, sent_at: float, jobs: Iterable[Job]) -> None:
        """A claim sent at `sent_at` returned `jobs`."""
        ids = frozenset(job.id for job in jobs)
        if ids:
            with self._lock:
                self._claims.append((sent_at, ids))

    def renewed(self, sent_at: float) -> None:
        """A renewal of every held lease, sent at `sent_at`, came back."""
        with self._lock:
            self._renewed_at = max(self._renewed_at, sent_at)
            self._claims = [c for c in self._claims if c[0] > sent_at]

    def overdue(self) -> bool:
        """Cheap: whether the last renewal is so old that some lease may have ended."""
        return self._renewed_at + self.lease - self.margin <= self._clock()

    def expired(self, jobs: Iterable[Job]) -> list[Job]:
        """Of `jobs` (held since their claim), those whose lease has ended here."""
        now = self._clock()
        if self._renewed_at + self.lease - self.margin > now:
            return []
        with self._lock:
            fresh = [ids for sent, ids in self._claims if sent + self.lease - self.margin > now]
        return [job for job in jobs if not any(job.id in ids for ids in fresh)]

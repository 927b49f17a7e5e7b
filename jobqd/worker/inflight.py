"""The jobs a worker holds, from claim until their outcome is written, and the rules that
keep its control thread and its slot threads from disagreeing about them.

A job is `running` from its claim until its slot finishes it; its outcome then waits in
`done` until the control thread writes it. A job can leave early: its lease was lost (the
reaper or a cancel took it) or it ran past its hard timeout. Such a job is `abandoned`: its
slot's late outcome is dropped, so nothing is written for a lease this worker no longer holds.

One lock guards the three collections, taken once per call (once per claimed batch, once per
finished job, once per written batch: what the hot path paid before this class). The counts
the control thread schedules by (`busy`, `waiting`, `free`) are read without it: the length of
a dict or list is read atomically, and a count one job stale only moves a wake-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from jobqd.tasks import Job
from jobqd.worker.executor import Outcome

LEASE_LOST = "lease lost"
"""The cancel reason of a job whose lease this worker lost."""


class InFlight:
    def __init__(self, concurrency: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.concurrency = concurrency
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[int, Job] = {}  # claimed, not finished by its slot
        self._done: list[Outcome] = []  # finished, outcome not yet written
        self._abandoned: set[int] = set()  # left early: its slot's late outcome is dropped
        self._first_done_at: float | None = None  # when the oldest waiting outcome came

    # -- counts, read without the lock ------------------------------------------------------

    @property
    def busy(self) -> int:
        """Jobs running in a slot."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Outcomes waiting to be written."""
        return len(self._done)

    @property
    def free(self) -> int:
        """Slots a claim may fill."""
        return self.concurrency - len(self._running)

    @property
    def first_done_at(self) -> float | None:
        """When the oldest outcome still waiting arrived (the completer's interval counts
        from it); None when none waits."""
        return self._first_done_at

    def empty(self) -> bool:
        """Nothing running and nothing to write: a drain is complete."""
        return not self._running and not self._done

    # -- the rules --------------------------------------------------------------------------

    def start(self, jobs: Iterable[Job]) -> None:
        """Claimed jobs enter: call before handing them to the slots."""
        with self._lock:
            for job in jobs:
                self._running[job.id] = job

    def finish(self, outcome: Outcome) -> bool:
        """A slot's outcome. Dropped if its job was abandoned or lost meanwhile. Returns True
        when it is the first outcome waiting, so the caller wakes the control thread."""
        job = outcome.job
        with self._lock:
            if job.id in self._abandoned:
                self._abandoned.discard(job.id)
                return False
            if self._running.pop(job.id, None) is None:
                return False
            if job.cancelled and job.cancel_reason == LEASE_LOST:
                return False
            self._done.append(outcome)
            if self._first_done_at is not None:
                return False
            self._first_done_at = self._clock()
            return True

    def lose(self, job: Job) -> None:
        """The lease is no longer ours: drop any waiting outcome of the job and ignore what
        its slot still returns. The caller tells the task (job.cancel(LEASE_LOST))."""
        with self._lock:
            self._done = [o for o in self._done if o.job.id != job.id]
            if not self._done:
                self._first_done_at = None
            if self._running.pop(job.id, None) is not None:
                self._abandoned.add(job.id)

    def time_out(self, job: Job, outcome: Callable[[], Outcome]) -> bool:
        """Past its hard timeout: the job's outcome becomes `outcome()` now and its slot's
        late one is dropped. False if the job had already finished."""
        with self._lock:
            if self._running.pop(job.id, None) is None:
                return False
            self._abandoned.add(job.id)
            self._done.append(outcome())
            if self._first_done_at is None:
                self._first_done_at = self._clock()
            return True

    def take(self) -> list[Outcome]:
        """Every waiting outcome, to write as one batch."""
        with self._lock:
            batch, self._done = self._done, []
            self._first_done_at = None
        return batch

    def put_back(self, batch: list[Outcome]) -> None:
        """A batch that could not be written waits again, ahead of newer outcomes."""
        if not batch:
            return
        with self._lock:
            self._done[:0] = batch
            if self._first_done_at is None:
                self._first_done_at = self._clock()

    def held(self) -> list[Job]:
        """Every job whose lease must be renewed: running, or finished but not yet written."""
        with self._lock:
            return [*self._running.values(), *(o.job for o in self._done)]

    def running(self) -> list[Job]:
        """The jobs in a slot now (for the timeout check)."""
        with self._lock:
            return list(self._running.values())

    def abandon_running(self) -> list[Job]:
        """At shutdown: every running job leaves, to be released; their slots' outcomes are
        dropped. Waiting outcomes stay, to be written."""
        with self._lock:
            unfinished = list(self._running.values())
            self._running.clear()
            self._abandoned.update(job.id for job in unfinished)
        return unfinished

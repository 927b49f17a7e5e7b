"""A worker's own clock ends its leases early, never late: counted from when the claim or
the renewal was sent, less a margin."""

from __future__ import annotations

from jobqd.tasks import Job
from jobqd.worker.leases import LocalLeases


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(job_id: int) -> Job:
    return Job(id=job_id, queue="q", task="t", attempt=1, max_attempts=3)


def test_a_lease_ends_a_margin_before_its_claim_plus_the_lease():
    clock = Clock()
    leases = LocalLeases(lease=3.0, margin=0.5, clock=clock)
    first = [job(1), job(2)]
    leases.claimed(100.0)
    leases.claimed(101.0)  # a later claim: its lease is counted from the first, early
    clock.now = 102.4
    assert not leases.overdue() and leases.expired(first) == []
    clock.now = 102.5
    assert leases.overdue() and leases.expired(first) == first


def test_a_renewal_moves_every_lease_held_when_it_was_sent():
    clock = Clock()
    leases = LocalLeases(lease=3.0, margin=0.5, clock=clock)
    held = [job(1)]
    leases.claimed(100.0)
    leases.renewed(101.0)
    clock.now = 103.4
    assert leases.expired(held) == []
    clock.now = 103.5
    assert leases.expired(held) == held


def test_nothing_is_overdue_while_renewals_come_back():
    clock = Clock()
    leases = LocalLeases(lease=3.0, margin=0.5, clock=clock)
    assert not leases.overdue()  # nothing claimed yet
    leases.claimed(100.0)
    for step in range(10):
        clock.now = 100.0 + step
        leases.renewed(clock.now)
        assert not leases.overdue()

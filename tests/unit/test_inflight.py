"""The worker's in-flight rules, without Postgres: what is held, what is written, what is
dropped when a job leaves early (lease lost, hard timeout, shutdown)."""

from __future__ import annotations

import threading

from jobqd.tasks import Job
from jobqd.worker.executor import DEAD, SUCCEEDED, Outcome
from jobqd.worker.inflight import LEASE_LOST, InFlight


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(n: int) -> Job:
    return Job(id=n, queue="q", task="t", attempt=1, max_attempts=3, lease_token=n * 10)


def ok(j: Job) -> Outcome:
    return Outcome(j, SUCCEEDED)


def test_start_fills_slots_and_finish_queues_the_outcome():
    clock = Clock()
    inflight = InFlight(4, clock)
    a, b = job(1), job(2)
    inflight.start([a, b])
    assert (inflight.busy, inflight.free, inflight.waiting) == (2, 2, 0)
    assert inflight.finish(ok(a)) is True  # the first waiting outcome: wake the writer
    clock.now = 101.0
    assert inflight.finish(ok(b)) is False
    assert inflight.first_done_at == 100.0
    assert (inflight.busy, inflight.free, inflight.waiting) == (0, 4, 2)
    assert [o.job.id for o in inflight.take()] == [1, 2]
    assert inflight.first_done_at is None
    assert inflight.empty()


def test_held_is_running_and_finished_but_unwritten():
    inflight = InFlight(4)
    a, b = job(1), job(2)
    inflight.start([a, b])
    inflight.finish(ok(a))
    assert sorted(j.id for j in inflight.held()) == [1, 2]
    inflight.take()
    assert [j.id for j in inflight.held()] == [2]
    assert [j.id for j in inflight.running()] == [2]


def test_a_batch_that_could_not_be_written_goes_back_ahead_of_newer_outcomes():
    clock = Clock()
    inflight = InFlight(4, clock)
    a, b = job(1), job(2)
    inflight.start([a, b])
    inflight.finish(ok(a))
    batch = inflight.take()
    inflight.finish(ok(b))
    clock.now = 105.0
    inflight.put_back(batch)
    assert [o.job.id for o in inflight.take()] == [1, 2]
    inflight.put_back([])
    assert inflight.first_done_at is None


def test_put_back_into_an_empty_queue_starts_the_interval_again():
    clock = Clock()
    inflight = InFlight(1, clock)
    a = job(1)
    inflight.start([a])
    inflight.finish(ok(a))
    batch = inflight.take()
    clock.now = 107.0
    inflight.put_back(batch)
    assert inflight.first_done_at == 107.0


def test_a_lost_running_job_frees_its_slot_and_its_late_outcome_is_dropped():
    inflight = InFlight(2)
    a = job(1)
    inflight.start([a])
    inflight.lose(a)
    assert (inflight.busy, inflight.free) == (0, 2)
    assert inflight.finish(ok(a)) is False
    assert inflight.take() == []
    assert inflight.held() == []


def test_a_lost_finished_job_has_its_waiting_outcome_removed():
    inflight = InFlight(2)
    a, b = job(1), job(2)
    inflight.start([a, b])
    inflight.finish(ok(a))
    inflight.finish(ok(b))
    inflight.lose(a)
    assert [o.job.id for o in inflight.take()] == [2]


def test_the_last_waiting_outcome_lost_clears_the_interval():
    inflight = InFlight(1)
    a = job(1)
    inflight.start([a])
    inflight.finish(ok(a))
    inflight.lose(a)
    assert inflight.first_done_at is None and inflight.empty()


def test_an_outcome_of_a_job_cancelled_for_a_lost_lease_is_not_written():
    inflight = InFlight(1)
    a = job(1)
    inflight.start([a])
    a.cancel(LEASE_LOST)
    assert inflight.finish(ok(a)) is False
    assert inflight.take() == [] and inflight.busy == 0


def test_time_out_writes_the_timeout_and_drops_the_slots_late_outcome():
    inflight = InFlight(2)
    a = job(1)
    inflight.start([a])
    timeout = Outcome(a, DEAD, error="timeout")
    assert inflight.time_out(a, lambda: timeout) is True
    assert inflight.busy == 0 and [j.id for j in inflight.held()] == [1]
    assert inflight.finish(ok(a)) is False
    assert inflight.take() == [timeout]


def test_time_out_of_a_job_that_already_finished_changes_nothing():
    inflight = InFlight(2)
    a = job(1)
    inflight.start([a])
    inflight.finish(ok(a))

    def unused() -> Outcome:
        raise AssertionError("no timeout outcome for a finished job")

    assert inflight.time_out(a, unused) is False
    assert [o.state for o in inflight.take()] == [SUCCEEDED]


def test_shutdown_abandons_running_jobs_and_keeps_waiting_outcomes():
    inflight = InFlight(3)
    a, b = job(1), job(2)
    inflight.start([a, b])
    inflight.finish(ok(a))
    assert [j.id for j in inflight.abandon_running()] == [2]
    assert inflight.finish(ok(b)) is False
    assert [o.job.id for o in inflight.take()] == [1]
    assert inflight.empty()


def test_slots_finishing_on_threads_lose_nothing():
    inflight = InFlight(400)
    jobs = [job(n) for n in range(400)]
    inflight.start(jobs)
    threads = [
        threading.Thread(target=lambda part=part: [inflight.finish(ok(j)) for j in part])
        for part in (jobs[0::4], jobs[1::4], jobs[2::4], jobs[3::4])
    ]
    written: list[Outcome] = []
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads) or inflight.waiting:
        written += inflight.take()
    assert sorted(o.job.id for o in written) == list(range(400))
    assert inflight.empty()

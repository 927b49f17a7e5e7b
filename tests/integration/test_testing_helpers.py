"""jobqd.testing: the helpers applications use in their own tests."""

from __future__ import annotations

import pytest

from jobqd import Client
from jobqd.tasks import Registry, task
from jobqd.testing import InlineClient, drain, run_job


@pytest.fixture
def registry():
    reg = Registry()
    calls: list[int] = []

    @task("double", registry=reg)
    def double(job):
        return job.args["n"] * 2

    @task("flaky", registry=reg, max_attempts=3)
    def flaky(job):
        calls.append(job.attempt)
        if job.attempt < 3:
            raise RuntimeError("not yet")
        return "finally"

    @task("emails.send", registry=reg)
    def send(job):
        raise AssertionError("emails must be ignored in tests")

    reg.calls = calls  # type: ignore[attr-defined]
    return reg


def test_run_job_uses_the_worker_decisions(registry):
    outcome = run_job("double", {"n": 4}, registry=registry)
    assert (outcome.state, outcome.result) == ("succeeded", "8")
    failed = run_job("flaky", registry=registry, attempt=1)
    assert failed.state == "queued" and "not yet" in failed.error
    last = run_job("flaky", registry=registry, attempt=3, max_attempts=3)
    assert last.state == "succeeded"
    unknown = run_job("nope", registry=registry, max_attempts=1)
    assert unknown.state == "dead" and "unknown task 'nope'" in unknown.error
    with pytest.raises(TypeError, match="not JSON-serializable"):
        run_job("double", {"n": object()}, registry=registry)


def test_inline_client_runs_at_once_with_retries_and_ignores(registry):
    client = InlineClient(registry=registry, ignore=["emails.*"])
    client.enqueue("double", {"n": 21})
    client.enqueue("flaky")
    client.enqueue("emails.send", {"to": "a@b"})
    runs = {r.task: r for r in client.runs}
    assert runs["double"].result == 42
    assert (runs["flaky"].state, runs["flaky"].attempts) == ("succeeded", 3)
    assert len(runs["flaky"].errors) == 2
    assert runs["emails.send"].state == "cancelled"


def test_drain_runs_a_queue_in_process_through_the_database(dsn, registry):
    with Client(dsn) as client:
        ids = client.enqueue_many([("double", {"n": i}) for i in range(5)])
        ignored = client.enqueue("emails.send")
        later = client.enqueue("double", {"n": 1}, delay=3600)
        counts = drain(dsn, registry=registry, ignore=["emails.*"])
        assert counts == {"succeeded": 5, "dead": 1}
        assert [client.get(i).result for i in ids] == [0, 2, 4, 6, 8]
        assert client.get(ignored).state == "dead"
        assert client.get(later).state == "queued"

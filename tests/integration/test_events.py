"""Job and bundle end events: NOTIFY from the database, read through client.listen()."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from helpers import LEDGER_TABLE, spawn_worker, wait_for, worker_config

from jobqd import Client, events
from jobqd.events import BundleEvent, JobEvent


@pytest.fixture
def client(dsn, conn):
    conn.execute(LEDGER_TABLE)
    with Client(dsn) as c:
        yield c


def trigger_state(conn) -> str:
    return conn.execute(
        "SELECT tgenabled FROM pg_trigger WHERE tgname = 'jobs_end_event'"
    ).fetchone()[0]


def collect(listener, into: list, until: int) -> threading.Thread:
    """Read events in a thread until `until` arrived (or the listener's timeout)."""

    def run() -> None:
        for event in listener:
            into.append(event)
            if len(into) >= until:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_job_events_are_off_until_the_queue_opts_in(client, conn):
    assert trigger_state(conn) == "D"  # no queue has events: the hot path pays nothing
    with client.listen(timeout=1.0) as listener:
        client.cancel(client.enqueue("t", queue="quiet"))
        assert list(listener) == []

    events.set_events(conn, "jobqd", "loud", True)
    assert trigger_state(conn) == "O"
    with client.listen(timeout=5.0) as listener:
        job_id = client.enqueue("t.loud", queue="loud")
        client.cancel(client.enqueue("t", queue="quiet"))
        client.cancel(job_id)
        got = next(iter(listener))
    assert got == JobEvent(id=job_id, queue="loud", task="t.loud", state="cancelled", attempt=0)

    events.set_events(conn, "jobqd", "loud", False)
    assert trigger_state(conn) == "D"


def test_worker_outcomes_are_published_once_per_end(client, conn, dsn):
    received: list = []
    listener = client.listen(timeout=30.0)
    reader = collect(listener, received, until=4)
    ok = [client.enqueue("test.noop") for _ in range(3)]
    failing = client.enqueue("test.fail")
    # `events: true` in the queue's config turns them on when its worker starts.
    config = worker_config(dsn, events=True)
    worker = spawn_worker(config, dsn)
    try:
        reader.join(30)
        assert not reader.is_alive(), f"only {received} arrived"
    finally:
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(10)
    by_id = {e.id: e for e in received}
    assert len(received) == 4  # retries of test.fail (back to queued) send nothing
    assert {by_id[i].state for i in ok} == {"succeeded"}
    assert (by_id[failing].state, by_id[failing].attempt) == ("dead", 3)

    quiet = spawn_worker(worker_config(dsn, events=False), dsn)
    try:
        wait_for(lambda: trigger_state(conn) == "D", what="events: false to switch them off")
    finally:
        os.kill(quiet.pid, signal.SIGTERM)
        quiet.join(10)


def test_queue_filter_and_bundle_events(client, conn):
    events.set_events(conn, "jobqd", "a", True)
    events.set_events(conn, "jobqd", "b", True)
    seen: list = []
    count = client.listen(seen.append, queues=["a"], timeout=0.01)
    assert count == 0
    received: list = []
    listener = client.listen(queues=["a"], timeout=10.0)
    reader = collect(listener, received, until=2)
    bundle_id, ids = client.enqueue_bundle([("t", {}), ("t", {})], queue="b", name="pair")
    for job_id in ids:
        client.cancel(job_id)
    a_job = client.enqueue("t", queue="a")
    client.cancel(a_job)
    reader.join(10)
    assert received == [
        BundleEvent(
            id=bundle_id,
            name="pair",
            total=2,
            succeeded=0,
            dead=0,
            cancelled=2,
            callback_job_id=None,
        ),
        JobEvent(id=a_job, queue="a", task="t", state="cancelled", attempt=0),
    ]


def test_callback_form_counts_what_it_handled(client, conn):
    events.set_events(conn, "jobqd", "default", True)
    handled: list = []
    done = threading.Event()

    def produce() -> None:
        wait_for(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jobqd events'"
                " AND datname = current_database() AND query LIKE '%%WHERE events%%'"
            ).fetchone()[0],
            what="the listener subscribed",
        )
        client.cancel(client.enqueue("t"))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert client.listen(handled.append, timeout=2.0) == 1
    assert done.is_set()
    assert handled[0].state == "cancelled"


def test_unknown_payloads_are_skipped():
    assert events.parse("not json") is None
    assert events.parse('{"type": "future"}') is None
    assert events.parse('{"type": "job", "id": 1}') is None

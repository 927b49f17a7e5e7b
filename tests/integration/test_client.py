"""The SQL API and the Python client against a real Postgres."""

from __future__ import annotations

import datetime as dt
import threading

import psycopg
import pytest

from jobqd import Client
from jobqd.errors import PayloadError


@pytest.fixture
def client(dsn):
    with Client(dsn) as c:
        yield c


def test_sql_enqueue_returns_id_and_stores_defaults(conn):
    job_id = conn.execute(
        "SELECT jobqd.enqueue('emails', 'send_welcome', '{\"user_id\": 7}')"
    ).fetchone()[0]
    row = conn.execute(
        "SELECT queue, task, args, state, attempt, priority, run_at <= now() FROM jobqd.jobs"
        " WHERE id = %s",
        (job_id,),
    ).fetchone()
    assert row == ("emails", "send_welcome", {"user_id": 7}, "queued", 0, 0, True)


def test_sql_enqueue_refuses_text_that_is_not_json(conn):
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        conn.execute("SELECT jobqd.enqueue('q', 't', 'not json')")
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 0


def test_client_enqueue_with_delay_priority_and_attempts(client, conn):
    job_id = client.enqueue(
        "send_welcome", {"user_id": 7}, queue="emails", delay=60, priority=-5, max_attempts=3
    )
    info = client.get(job_id)
    assert (info.queue, info.task, info.args) == ("emails", "send_welcome", {"user_id": 7})
    assert (info.priority, info.max_attempts, info.state) == (-5, 3, "queued")
    delay = conn.execute(
        "SELECT extract(epoch FROM run_at - created_at) FROM jobqd.jobs WHERE id = %s", (job_id,)
    ).fetchone()[0]
    assert 59 <= float(delay) <= 61


def test_client_enqueue_run_at(client):
    when = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    info = client.get(client.enqueue("t", run_at=when))
    assert info.run_at == when
    with pytest.raises(ValueError, match="delay or run_at"):
        client.enqueue("t", delay=1, run_at=when)


def test_args_that_are_not_json_are_refused_naming_the_value(client, conn):
    with pytest.raises(TypeError, match=r"args\['when'\] = datetime"):
        client.enqueue("t", {"when": dt.datetime.now()})
    with pytest.raises(TypeError, match=r"args\['xs'\]\[1\] = nan"):
        client.enqueue("t", {"xs": [1, float("nan")]})
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 0


def test_payload_limit_enforced_by_client_and_database(dsn, conn):
    with Client(dsn, max_payload_bytes=100) as small, pytest.raises(PayloadError, match="100"):
        small.enqueue("t", {"blob": "x" * 200})
    conn.execute("UPDATE jobqd.settings SET max_payload_bytes = 1000")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="over the limit"):
        conn.execute("SELECT jobqd.enqueue('q', 't', %s::jsonb)", ('{"b": "' + "y" * 5000 + '"}',))
    with Client(dsn) as c, pytest.raises(psycopg.errors.InvalidParameterValue):
        c.enqueue_many([("t", {"b": "z" * 5000})])
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 0


def test_enqueue_in_callers_transaction_rolls_back(client, dsn, conn):
    with psycopg.connect(dsn) as app:
        client.enqueue("t", {"n": 1}, conn=app)
        client.enqueue_many([("t", {"n": 2}), ("t", {"n": 3})], conn=app)
        app.rollback()
        kept = client.enqueue("t", {"n": 4}, conn=app)
        app.commit()
    rows = conn.execute("SELECT id, args FROM jobqd.jobs").fetchall()
    assert rows == [(kept, {"n": 4})]


def test_dedup_key_returns_existing_job_while_live(client, conn):
    first = client.enqueue("t", {"v": 1}, queue="q", dedup_key="k")
    assert client.enqueue("t", {"v": 2}, queue="q", dedup_key="k") == first
    other_queue = client.enqueue("t", queue="other", dedup_key="k")
    assert other_queue != first
    conn.execute(
        "UPDATE jobqd.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s", (first,)
    )
    again = client.enqueue("t", queue="q", dedup_key="k")
    assert again not in (first, other_queue)
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 3


def test_eight_threads_same_dedup_key_make_one_job(dsn, conn):
    barrier = threading.Barrier(8)
    ids: list[int] = []
    errors: list[BaseException] = []

    def enqueue() -> None:
        try:
            with Client(dsn, pool_size=1) as c:
                c.enqueue("t", queue="q", dedup_key="same")  # opens the pool before the race
                barrier.wait()
                ids.append(c.enqueue("t", queue="q", dedup_key="same"))
        except BaseException as exc:
            errors.append(exc)

    conn.execute("DELETE FROM jobqd.jobs")
    threads = [threading.Thread(target=enqueue) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(ids)) == 1
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 1


def test_idempotency_key_outlives_the_job(client, conn):
    first = client.enqueue("charge", {"cents": 100}, idempotency_key="req-1")
    conn.execute("DELETE FROM jobqd.jobs")  # finished and pruned
    assert client.enqueue("charge", {"cents": 100}, idempotency_key="req-1") == first
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 0
    conn.execute("UPDATE jobqd.idempotency_keys SET expires_at = now() - interval '1 s'")
    fresh = client.enqueue("charge", {"cents": 100}, idempotency_key="req-1")
    assert fresh != first
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 1


def test_enqueue_many_keeps_input_order_and_per_item_options(client, conn):
    ids = client.enqueue_many(
        [
            ("a", {"i": 1}),
            {"task": "b", "args": {"i": 2}, "queue": "other", "priority": 3},
            {"task": "c", "dedup_key": "d"},
            {"task": "c", "dedup_key": "d"},
            {"task": "e", "delay": 3600},
        ],
        queue="q",
        max_attempts=4,
    )
    assert len(ids) == 5 and ids[2] == ids[3] and len(set(ids)) == 4
    rows = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT id, queue, task, args, priority, max_attempts, run_at > now() + interval '59m'"
            " FROM jobqd.jobs"
        )
    }
    assert rows[ids[0]] == ("q", "a", {"i": 1}, 0, 4, False)
    assert rows[ids[1]] == ("other", "b", {"i": 2}, 3, 4, False)
    assert rows[ids[2]][:2] == ("q", "c")
    assert rows[ids[4]][-1] is True


def test_enqueue_many_large_batch_is_atomic_and_complete(client, conn):
    ids = client.enqueue_many(("t", {"i": i}) for i in range(12_345))
    assert len(ids) == len(set(ids)) == 12_345
    assert (
        conn.execute("SELECT count(*), min(args->>'i'), max(id) FROM jobqd.jobs").fetchone()[0]
        == 12_345
    )
    with pytest.raises(TypeError):
        client.enqueue_many([("t", {"i": i}) for i in range(6000)] + [("t", {"bad": object()})])
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 12_345


def test_enqueue_many_run_at_per_item_and_wrong_types_refused(client, conn):
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    ids = client.enqueue_many([{"task": "t", "run_at": when}, ("t", None)], delay=60)
    run_ats = dict(conn.execute("SELECT id, run_at FROM jobqd.jobs").fetchall())
    assert run_ats[ids[0]] == when
    assert dt.timedelta(seconds=50) < run_ats[ids[1]] - conn.execute("SELECT now()").fetchone()[0]
    with pytest.raises(TypeError, match="expected an integer, got '5'"):
        client.enqueue_many([{"task": "t", "priority": "5"}])
    with pytest.raises(TypeError, match="expected text, got 7"):
        client.enqueue_many([(7, {})])
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 2


def test_enqueue_many_dedup_against_existing_job(client):
    existing = client.enqueue("t", queue="q", dedup_key="k")
    assert client.enqueue_many([{"task": "t", "dedup_key": "k"}], queue="q") == [existing]


NASTY = [
    "q'; DROP TABLE jobqd.jobs; --",
    'q"\\x\\\\;',
    "$$ $1 %s %(x)s {schema} \\x01",
    "ünïcødé — 🚀",
    "NULL",
    '{a,"b"} ',
]


@pytest.mark.parametrize("name", NASTY)
def test_names_and_args_are_stored_verbatim(client, conn, name):
    job_id = client.enqueue(name, {name: name}, queue=name, dedup_key=name)
    sql_id = conn.execute("SELECT jobqd.enqueue(%s, %s, %s::jsonb)", (name, name, '{"a": 1}'))
    many = client.enqueue_many(
        [(name, {"k": name}), {"task": name, "queue": name + "2", "dedup_key": name}],
        queue=name,
    )
    client.pause(name)
    client.resume(name)
    info = client.get(job_id)
    assert (info.queue, info.task, info.args, info.dedup_key) == (name, name, {name: name}, name)
    assert client.get(sql_id.fetchone()[0]).queue == name
    assert client.get(many[0]).args == {"k": name}
    second = client.get(many[1])
    assert (second.task, second.queue, second.dedup_key) == (name, name + "2", name)
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 4
    assert conn.execute("SELECT name FROM jobqd.queues").fetchone()[0] == name


def test_retry_and_cancel(client, conn):
    job = client.enqueue("t", queue="q")
    assert client.cancel(job) is True
    assert client.get(job).state == "cancelled"
    assert client.cancel(job) is False
    assert client.retry(job) is True
    info = client.get(job)
    assert (info.state, info.attempt, info.finished_at) == ("queued", 0, None)
    assert client.retry(999_999) is False
    conn.execute(
        "UPDATE jobqd.jobs SET state = 'dead', attempt = 3, finished_at = now(),"
        " last_error = 'boom'"
    )
    assert client.retry_queue("q", "dead") == 1
    assert client.get(job).state == "queued" and client.get(job).last_error == "boom"
    conn.execute("UPDATE jobqd.jobs SET state = 'succeeded', finished_at = now()")
    assert client.retry(job) is False


def test_pause_and_resume_are_recorded(client, conn):
    client.pause("emails")
    assert conn.execute("SELECT paused FROM jobqd.queues WHERE name = 'emails'").fetchone() == (
        True,
    )
    client.resume("emails")
    assert conn.execute("SELECT paused FROM jobqd.queues WHERE name = 'emails'").fetchone() == (
        False,
    )


def test_list_filters_newest_first(client):
    a = client.enqueue("t", queue="a")
    b = client.enqueue("t", queue="b")
    c = client.enqueue("t", queue="a")
    assert [j.id for j in client.list()] == [c, b, a]
    assert [j.id for j in client.list(queue="a", limit=1)] == [c]
    client.cancel(b)
    assert [j.id for j in client.list(state="cancelled")] == [b]


def test_enqueue_notifies_the_queue_channel_once_per_transaction(client, dsn):
    with psycopg.connect(dsn, autocommit=True) as listener:
        channel = listener.execute("SELECT jobqd.queue_channel('emails')").fetchone()[0]
        listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        client.enqueue_many([("t", {"i": i}) for i in range(1000)], queue="emails")
        client.enqueue("t", queue="emails", delay=3600)  # future jobs do not wake workers
        received = list(listener.notifies(timeout=1.0))
    assert len(received) == 1 and received[0].channel == channel


def test_database_constraints_reject_impossible_states(conn):
    job = conn.execute("SELECT jobqd.enqueue('q', 't')").fetchone()[0]
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE jobqd.jobs SET state = 'exploded' WHERE id = %s", (job,))
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE jobqd.jobs SET state = 'running' WHERE id = %s", (job,))
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE jobqd.jobs SET state = 'succeeded' WHERE id = %s", (job,))

"""The worker protocol as SQL functions (migration 0006): claim, heartbeat, complete, fail,
snooze, discard, fenced by lease token; timed pause; the external worker's holder row and
its leases reaped like any other; grant_worker; the SQL backoff against Python's."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from jobqd.backoff import Backoff
from jobqd.config.settings import parse
from jobqd.maintenance.reaper import run_once
from jobqd.store.sql import queries

SQL = queries("jobqd")
SETTINGS = parse("", "<test>", {})


def claim(conn, queue="q", n=10, lease="30 seconds", worker="node-a"):
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute("SELECT * FROM jobqd.claim(%s, %s, %s, %s)", (queue, n, lease, worker))


def one(conn, statement, params=()):
    return conn.cursor(row_factory=dict_row).execute(statement, params).fetchall()


def job(conn, job_id):
    return one(conn, "SELECT * FROM jobqd.jobs WHERE id = %s", (job_id,))[0]


def sync_queue(conn, queue="q", max_attempts=20, backoff=None):
    conn.execute(
        SQL.queues_sync,
        {
            "queue": queue,
            "max_attempts": max_attempts,
            "delivery": "at_least_once",
            "backoff": backoff.as_json() if backoff else None,
        },
    )


def test_claim_in_claim_order_with_fresh_tokens_and_a_named_holder(conn):
    ids = [
        conn.execute(
            "SELECT jobqd.enqueue('q', 't', %s, priority => %s)", (json.dumps(a), p)
        ).fetchone()[0]
        for a, p in (({"n": 1}, 0), ({"n": 2}, -5), ({"n": 3}, 0), ({"n": 4}, 0))
    ]
    rows = claim(conn, n=3).fetchall()
    assert [r["id"] for r in rows] == [ids[1], ids[0], ids[2]]
    assert [r["args"] for r in rows] == [{"n": 2}, {"n": 1}, {"n": 3}]
    assert {r["attempt"] for r in rows} == {1} and len({r["lease_token"] for r in rows}) == 3
    assert all(r["queue"] == "q" and r["task"] == "t" for r in rows)
    holder = one(
        conn,
        "SELECT p.role, p.host FROM jobqd.jobs j JOIN jobqd.processes p ON p.id = j.locked_by"
        " WHERE j.id = %s",
        (ids[0],),
    )
    assert holder == [{"role": "external", "host": "node-a"}]
    assert [r["id"] for r in claim(conn, n=10, worker="node-a").fetchall()] == [ids[3]]
    # One holder row per worker name, however often it claims.
    count = "SELECT count(*) FROM jobqd.processes WHERE role = 'external'"
    assert conn.execute(count).fetchone()[0] == 1


def test_every_write_is_fenced_and_a_lost_lease_returns_no_row(conn):
    for _ in range(5):
        conn.execute("SELECT jobqd.enqueue('q', 't')")
    rows = claim(conn, n=5).fetchall()
    a, b, c, d, e = ((r["id"], r["lease_token"]) for r in rows)
    stale = [(a[0], a[1] + 1000)]  # a token that was never this job's

    assert one(conn, "SELECT * FROM jobqd.complete(%s, %s)", stale[0]) == []
    assert one(conn, "SELECT * FROM jobqd.fail(%s, %s, 'x')", stale[0]) == []
    assert one(conn, "SELECT * FROM jobqd.snooze(%s, %s, 1)", stale[0]) == []
    assert one(conn, "SELECT * FROM jobqd.discard(%s, %s, 'x')", stale[0]) == []
    assert job(conn, a[0])["state"] == "running"

    done = one(conn, "SELECT * FROM jobqd.complete(%s, %s, '{\"ok\": 1}')", a)
    assert [(r["id"], r["state"], r["attempt"]) for r in done] == [(a[0], "succeeded", 1)]
    assert job(conn, a[0])["result"] == {"ok": 1}
    # The same token again: the lease ended with the outcome.
    assert one(conn, "SELECT * FROM jobqd.complete(%s, %s)", a) == []
    assert one(conn, "SELECT * FROM jobqd.complete(%s, %s)", b)[0]["state"] == "succeeded"

    # Cancelled while running: the heartbeat drops it and every outcome is refused.
    conn.execute("SELECT jobqd.cancel(%s)", (c[0],))
    held = one(
        conn,
        "SELECT * FROM jobqd.heartbeat(%s, %s, '1 minute')",
        ([c[0], d[0], e[0]], [c[1], d[1], e[1]]),
    )
    assert [r["id"] for r in held] == [d[0], e[0]]
    assert one(conn, "SELECT * FROM jobqd.complete(%s, %s)", c) == []
    assert job(conn, c[0])["state"] == "cancelled"

    snoozed = one(conn, "SELECT * FROM jobqd.snooze(%s, %s, 60)", d)[0]
    assert (snoozed["state"], snoozed["attempt"]) == ("queued", 0)
    wait = conn.execute("SELECT run_at - now() FROM jobqd.jobs WHERE id = %s", (d[0],)).fetchone()
    assert 55 < wait[0].total_seconds() <= 60
    gone = one(conn, "SELECT * FROM jobqd.discard(%s, %s, 'bad input')", e)[0]
    assert gone["state"] == "dead"
    row = job(conn, e[0])
    assert row["last_error"] == "bad input" and row["errors"][-1]["kind"] == "Discard"


def test_heartbeat_renews_to_the_new_lease(conn):
    conn.execute("SELECT jobqd.enqueue('q', 't')")
    r = claim(conn, n=1, lease="5 seconds").fetchone()
    held = one(
        conn, "SELECT * FROM jobqd.heartbeat(%s, %s, '10 minutes')", ([r["id"]], [r["lease_token"]])
    )
    assert [h["id"] for h in held] == [r["id"]]
    left = conn.execute(
        "SELECT lease_expires_at - now() FROM jobqd.jobs WHERE id = %s", (r["id"],)
    ).fetchone()[0]
    assert left.total_seconds() > 590


def test_fail_retries_with_the_queues_backoff_then_ends_dead(conn):
    """fail() with no retry_in waits the queue's published backoff (Backoff's formula), and
    ends the job dead on its last attempt, as the Python worker decides."""
    sync_queue(conn, max_attempts=3, backoff=Backoff(base=10.0, cap=25.0, jitter=0.0))
    job_id = conn.execute("SELECT jobqd.enqueue('q', 't')").fetchone()[0]
    waits = []
    for attempt in (1, 2, 3):
        conn.execute("UPDATE jobqd.jobs SET run_at = now() WHERE id = %s", (job_id,))
        r = claim(conn, n=1).fetchone()
        assert (r["id"], r["attempt"], r["max_attempts"]) == (job_id, attempt, None)
        out = one(
            conn,
            "SELECT *, run_at - now() AS wait FROM jobqd.fail(%s, %s, %s, kind => 'Timeout',"
            " traceback => 'tb')",
            (job_id, r["lease_token"], f"boom {attempt}"),
        )[0]
        waits.append((out["state"], round(out["wait"].total_seconds())))
    assert waits == [("queued", 10), ("queued", 20), ("dead", 0)]
    row = job(conn, job_id)
    assert row["last_error"] == "boom 3" and row["finished_at"] is not None
    assert [(e["attempt"], e["kind"], e["traceback"]) for e in row["errors"]] == [
        (1, "Timeout", "tb"),
        (2, "Timeout", "tb"),
        (3, "Timeout", "tb"),
    ]


def test_fail_with_retry_in_and_the_jobs_own_limit(conn):
    job_id = conn.execute("SELECT jobqd.enqueue('q', 't', max_attempts => 2)").fetchone()[0]
    r = claim(conn, n=1).fetchone()
    assert r["max_attempts"] == 2
    out = one(
        conn,
        "SELECT *, run_at - now() AS wait FROM jobqd.fail(%s, %s, 'x', '90 seconds')",
        (job_id, r["lease_token"]),
    )[0]
    assert out["state"] == "queued" and 85 < out["wait"].total_seconds() <= 90
    conn.execute("UPDATE jobqd.jobs SET run_at = now() WHERE id = %s", (job_id,))
    r = claim(conn, n=1).fetchone()
    out = one(conn, "SELECT * FROM jobqd.fail(%s, %s, 'x', '1 second')", (job_id, r["lease_token"]))
    assert out[0]["state"] == "dead"


@pytest.mark.parametrize(
    "backoff",
    [Backoff(base=2.0, cap=100.0, jitter=0.0), Backoff(kind="fixed", base=7.0, jitter=0.0)],
)
def test_sql_backoff_is_pythons_backoff(conn, backoff):
    sync_queue(conn, backoff=backoff)
    for attempt in range(1, 12):
        sql = conn.execute("SELECT jobqd.backoff_delay('t', 'q', %s)", (attempt,)).fetchone()[0]
        assert sql == pytest.approx(backoff.delay(attempt))


def test_sql_backoff_jitter_stays_in_pythons_bounds_and_a_tasks_backoff_wins(conn):
    sync_queue(conn, backoff=Backoff(base=100.0, cap=1000.0, jitter=0.2))
    delays = [
        r[0]
        for r in conn.execute(
            "SELECT jobqd.backoff_delay('t', 'q', 1) FROM generate_series(1, 200)"
        ).fetchall()
    ]
    assert 80 <= min(delays) < 95 and 105 < max(delays) <= 120
    conn.execute(
        SQL.tasks_sync,
        {
            "name": "t",
            "queue": "q",
            "max_attempts": None,
            "delivery": None,
            "backoff": Backoff(kind="fixed", base=3.0, jitter=0.0).as_json(),
        },
    )
    assert conn.execute("SELECT jobqd.backoff_delay('t', 'q', 5)").fetchone()[0] == 3.0
    # No backoff published anywhere: Backoff()'s defaults.
    assert conn.execute("SELECT jobqd.backoff_delay('u', 'nowhere', 40)").fetchone()[0] == (
        pytest.approx(3600.0, rel=0.11)
    )


def test_timed_pause_ends_by_itself_and_resume_ends_it_early(conn):
    conn.execute("SELECT jobqd.enqueue('q', 't')")
    conn.execute("SELECT jobqd.pause('q', '1 second', 'ops@test')")
    status = {q["queue"]: q for q in one(conn, SQL.queues_status)}["q"]
    assert status["paused"] is True and status["paused_by"] == "ops@test"
    assert status["paused_until"] is not None
    assert claim(conn).fetchall() == []
    until = status["paused_until"]
    while conn.execute("SELECT now() <= %s", (until,)).fetchone()[0]:
        time.sleep(0.05)
    assert len(claim(conn).fetchall()) == 1
    status = {q["queue"]: q for q in one(conn, SQL.queues_status)}["q"]
    assert (status["paused"], status["paused_by"], status["paused_until"]) == (False, None, None)

    conn.execute("SELECT jobqd.enqueue('q', 't')")
    conn.execute("SELECT jobqd.pause('q', '1 hour')")
    assert claim(conn).fetchall() == []
    conn.execute("SELECT jobqd.resume('q')")
    assert len(claim(conn).fetchall()) == 1
    paused = "SELECT paused, paused_until, paused_by FROM jobqd.queues WHERE name = 'q'"
    assert conn.execute(paused).fetchone() == (False, None, None)


def test_bad_arguments_are_named(conn):
    cases = [
        ("SELECT * FROM jobqd.claim('q', 0, '30s', 'w')", "max_jobs must be between 1 and 1000"),
        ("SELECT * FROM jobqd.claim('q', 5, '0.5s', 'w')", "lease must be at least 1 second"),
        ("SELECT * FROM jobqd.claim('q', 5, '30s', '')", "invalid worker name"),
        ("SELECT * FROM jobqd.claim('', 5, '30s', 'w')", "invalid queue name"),
        ("SELECT * FROM jobqd.heartbeat('{1,2}', '{1}', '30s')", "the same length"),
        ("SELECT * FROM jobqd.snooze(1, 1, -1)", "seconds must be a finite number"),
        ("SELECT * FROM jobqd.fail(1, 1, 'x', '-1s')", "retry_in must not be negative"),
        ("SELECT jobqd.pause('q', '-5 minutes')", "duration must be positive"),
    ]
    for statement, message in cases:
        with pytest.raises(psycopg.DataError, match=message):
            conn.execute(statement)


def test_a_result_over_the_payload_limit_is_refused(conn):
    conn.execute("UPDATE jobqd.settings SET max_payload_bytes = 100")
    conn.execute("SELECT jobqd.enqueue('q', 't')")
    r = claim(conn, n=1).fetchone()
    big = json.dumps({"blob": "x" * 500})
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="over the limit of 100"):
        conn.execute("SELECT * FROM jobqd.complete(%s, %s, %s)", (r["id"], r["lease_token"], big))
    assert job(conn, r["id"])["state"] == "running"


def test_an_external_workers_expired_leases_are_reaped_and_its_row_outlives_them(conn):
    """No heartbeat: the lease runs out and the reaper re-queues the job, naming the worker;
    the holder row, silent for longer than process_grace, is kept while it holds a job."""
    first = conn.execute("SELECT jobqd.enqueue('q', 't')").fetchone()[0]
    second = conn.execute("SELECT jobqd.enqueue('q', 't')").fetchone()[0]
    rows = claim(conn, n=2, worker="gone-node").fetchall()
    holder = job(conn, first)["locked_by"]
    quiet = "UPDATE jobqd.processes SET heartbeat_at = now() - interval '1 hour' WHERE id = %s"
    conn.execute(quiet, (holder,))
    # The second job's lease is still valid: the silent row and that job are left alone.
    conn.execute(
        "UPDATE jobqd.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (first,),
    )
    reaped = run_once(conn, SETTINGS)
    assert reaped.queued == [first] and reaped.processes == []
    row = job(conn, first)
    assert row["state"] == "queued" and row["attempt"] == 1
    assert row["last_error"] == "lease expired: external worker 'gone-node' stopped renewing it"
    assert job(conn, second)["state"] == "running"
    stale = (first, rows[0]["lease_token"] if rows[0]["id"] == first else rows[1]["lease_token"])
    assert one(conn, "SELECT * FROM jobqd.complete(%s, %s)", stale) == []

    conn.execute(
        "UPDATE jobqd.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (second,),
    )
    reaped = run_once(conn, SETTINGS)
    assert reaped.queued == [second]
    conn.execute(quiet, (holder,))
    assert run_once(conn, SETTINGS).processes == [holder]


def _as_role(dsn: str, role: str) -> str:
    params = conninfo_to_dict(dsn)
    params["user"] = role
    return make_conninfo("", **params)


@pytest.fixture
def worker_role(conn):
    role = f"jobqd_protocol_worker_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute("SELECT jobqd.grant_worker(%s)", (role,))
    yield role
    conn.execute(f"DROP OWNED BY {role}")
    conn.execute(f"DROP ROLE {role}")


def test_worker_role_claims_and_finishes_and_does_nothing_else(dsn, conn, worker_role):
    secret = conn.execute("SELECT jobqd.enqueue('other', 't', '{\"card\": \"4111\"}')").fetchone()
    for _ in range(4):
        conn.execute("SELECT jobqd.enqueue('q', 't')")
    with psycopg.connect(_as_role(dsn, worker_role), autocommit=True) as c:
        rows = claim(c, n=4, worker="role-node").fetchall()
        assert len(rows) == 4
        (a, ta), (b, tb), (d, td), (e, te) = ((r["id"], r["lease_token"]) for r in rows)
        assert len(one(c, "SELECT * FROM jobqd.heartbeat(%s, %s, '1 minute')", ([a], [ta]))) == 1
        assert one(c, "SELECT * FROM jobqd.complete(%s, %s)", (a, ta))[0]["state"] == "succeeded"
        assert one(c, "SELECT * FROM jobqd.fail(%s, %s, 'x')", (b, tb))[0]["state"] == "queued"
        assert one(c, "SELECT * FROM jobqd.snooze(%s, %s, 5)", (d, td))[0]["state"] == "queued"
        assert one(c, "SELECT * FROM jobqd.discard(%s, %s, 'no')", (e, te))[0]["state"] == "dead"
        assert c.execute("SELECT jobqd.queue_channel('q')").fetchone()[0].startswith("jobqd_")
        forbidden = [
            "SELECT args FROM jobqd.jobs",
            "SELECT * FROM jobqd.processes",
            f"UPDATE jobqd.jobs SET state = 'cancelled' WHERE id = {secret[0]}",
            "SELECT jobqd.enqueue('q', 't')",
            f"SELECT jobqd.cancel({secret[0]})",
            f"SELECT jobqd.retry({b})",
            "SELECT jobqd.pause('q')",
            "SELECT * FROM jobqd.claim_batch('other', 5, '1 minute', 1)",
            "SELECT * FROM jobqd.finish_batch('{1}', '{1}', '{succeeded}', '{0}', '{null}',"
            " '{null}', '{f}')",
            "SELECT jobqd.grant_worker(current_user)",
            "DELETE FROM jobqd.jobs",
        ]
        for statement in forbidden:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
    assert job(conn, secret[0])["state"] == "queued"


def test_the_sql_in_docs_protocol_md_runs_as_written(conn):
    """Every sql block of docs/protocol.md, in order, on a fresh database (the role renamed to
    one of this test's own)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    role = f"jobqd_protocol_docs_{uuid.uuid4().hex[:8]}"
    try:
        for block in blocks:
            conn.execute(block.replace("node_worker", role))
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE IF EXISTS {role}")
    ended = conn.execute("SELECT id, state, attempt FROM jobqd.jobs ORDER BY id").fetchall()
    assert ended == [(1, "succeeded", 1), (2, "queued", 1), (3, "queued", 0), (4, "dead", 1)]
    assert conn.execute("SELECT paused FROM jobqd.queues WHERE name = 'emails'").fetchone() == (
        False,
    )

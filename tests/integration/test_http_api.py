"""The http child's worker and admin endpoints, as a real process over a real database:
scopes, the protocol round trip, errors and limits, long-poll wake-ups and the listener."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request

import psycopg
import pytest
from faults import Proxy
from helpers import scalar, wait_for
from test_http import HttpChild, children  # noqa: F401 (a fixture)

from jobqd import Client
from jobqd.http.wakeups import Wakeups

WORKER, ENQUEUER, ADMIN, BOTH = "w-token", "e-token", "a-token", "we-token"
TOKENS = ", tokens: {worker: [T_WORKER, T_BOTH], enqueue: [T_ENQUEUE, T_BOTH], admin: T_ADMIN}"
ENV = {"T_WORKER": WORKER, "T_ENQUEUE": ENQUEUER, "T_ADMIN": ADMIN, "T_BOTH": BOTH}


@pytest.fixture
def api(children, dsn):  # noqa: F811
    """An http child with a token of each scope (and the old token_env one, admin)."""
    http = TOKENS + ", max_claim: 50, max_wait: 20s, max_waiters: 1"
    return children(dsn, http=http, env=ENV, max_body="64KiB")


def post(child: HttpChild, path: str, body=None, token: str = WORKER):
    return child.call(path, method="POST", body={} if body is None else body, token=token)


def claim(child: HttpChild, queue: str = "default", token: str = WORKER, **body):
    body.setdefault("worker", "test-worker")
    return post(child, f"/queues/{queue}/claim", body, token)


def execute(dsn: str, statement: str, params=None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


def job_row(dsn: str, job_id: int) -> tuple:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT state, attempt, last_error, result FROM jobqd.jobs WHERE id = %s", (job_id,)
        ).fetchone()


def test_scopes(api, dsn):
    assert claim(api, token="")[0] == 401
    status, body = claim(api, token="nope")
    assert (status, body) == (401, {"error": "missing or wrong bearer token"})

    status, body = claim(api, token=ENQUEUER)
    assert status == 403
    assert "POST /queues/{queue}/claim needs a token with the 'worker' scope" in body["error"]
    status, body = post(api, "/jobs", {"task": "t"}, ENQUEUER)
    assert status == 201
    for path in ("/queues", f"/jobs/{body['id']}", "/jobs", "/queues/default"):
        assert api.call(path, token=ENQUEUER)[0] == 403, path

    status, body = post(api, "/jobs", {"task": "t"}, WORKER)
    assert status == 403 and "'enqueue' scope" in body["error"]
    status, body = post(api, "/jobs/1/retry", token=WORKER)
    assert status == 403 and "'admin' scope" in body["error"]
    assert api.call("/queues/default", token=WORKER)[0] == 200
    status, body = claim(api, token=WORKER)
    assert status == 200 and len(body["jobs"]) == 1

    # a token under two scopes has both; admin (http.tokens or token_env) has every scope
    assert post(api, "/jobs", {"task": "t"}, BOTH)[0] == 201
    assert claim(api, token=BOTH)[0] == 200
    for token in (ADMIN, "s3cret-token"):
        assert post(api, "/jobs", {"task": "t"}, token)[0] == 201
        assert claim(api, token=token)[0] == 200
        assert api.call("/jobs", token=token)[0] == 200
    request = urllib.request.Request(api.base + "/queues/default")
    request.add_header("Authorization", f"bEaReR {WORKER}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_claim_heartbeat_and_every_outcome(api, dsn):
    with Client(dsn) as client:
        ids = [client.enqueue("t", {"n": n}, priority=n % 2) for n in range(6)]
        client.enqueue("t", delay=600)  # not due
    status, body = claim(api, max=4, lease=5)
    assert status == 200
    jobs = body["jobs"]
    # claim order: priority, then run_at, then id
    assert [j["id"] for j in jobs] == [ids[0], ids[2], ids[4], ids[1]]
    assert {j["attempt"] for j in jobs} == {1}
    assert all(isinstance(j["lease_token"], int) for j in jobs)
    assert jobs[0]["args"] == {"n": 0} and jobs[0]["task"] == "t"
    assert scalar(dsn, "SELECT host FROM jobqd.processes WHERE role = 'external'") == "test-worker"
    first, second, third, fourth = jobs

    status, renewed = post(
        api, f"/jobs/{first['id']}/heartbeat", {"lease_token": first["lease_token"], "lease": 60}
    )
    assert status == 200 and renewed["id"] == first["id"]
    left = scalar(
        dsn, "SELECT lease_expires_at - now() FROM jobqd.jobs WHERE id = %s", (first["id"],)
    )
    assert left.total_seconds() > 50
    status, body = post(
        api, f"/jobs/{first['id']}/heartbeat", {"lease_token": first["lease_token"] + 1, "lease": 9}
    )
    assert status == 409 and body["error"].startswith(f"lease lost: job {first['id']} is running")
    status, batch = post(
        api,
        "/jobs/heartbeat",
        {
            "lease": "1m",
            "jobs": [
                {"id": second["id"], "lease_token": second["lease_token"]},
                {"id": third["id"], "lease_token": third["lease_token"] + 1000},
            ],
        },
    )
    assert status == 200
    assert [h["id"] for h in batch["held"]] == [second["id"]] and batch["lost"] == [third["id"]]

    status, done = post(
        api,
        f"/jobs/{first['id']}/complete",
        {"lease_token": first["lease_token"], "result": {"ok": 1}},
    )
    assert (status, done["state"], done["attempt"]) == (200, "succeeded", 1)
    assert job_row(dsn, first["id"]) == ("succeeded", 1, None, {"ok": 1})
    # the same lease token again: the lease is gone, nothing is written
    status, body = post(api, f"/jobs/{first['id']}/complete", {"lease_token": first["lease_token"]})
    assert status == 409
    assert body["error"].startswith(f"lease lost: job {first['id']} is succeeded (attempt 1)")
    assert post(api, "/jobs/999999/complete", {"lease_token": 1})[0] == 404

    status, failed = post(
        api,
        f"/jobs/{second['id']}/fail",
        {"lease_token": second["lease_token"], "error": "boom", "retry_in": 0},
    )
    assert (status, failed["state"], failed["attempt"]) == (200, "queued", 1)
    assert job_row(dsn, second["id"])[:3] == ("queued", 1, "boom")

    status, snoozed = post(
        api, f"/jobs/{third['id']}/snooze", {"lease_token": third["lease_token"], "seconds": 300}
    )
    assert (status, snoozed["state"]) == (200, "queued")
    assert job_row(dsn, third["id"])[:2] == ("queued", 0)  # the attempt was not spent

    status, discarded = post(
        api,
        f"/jobs/{fourth['id']}/discard",
        {"lease_token": fourth["lease_token"], "reason": "not worth it"},
    )
    assert (status, discarded["state"]) == (200, "dead")
    assert job_row(dsn, fourth["id"])[:3] == ("dead", 1, "not worth it")

    # the failed job is due again; its last allowed attempt fails into dead
    execute(dsn, "UPDATE jobqd.jobs SET max_attempts = 2 WHERE id = %s", (second["id"],))
    again = next(j for j in claim(api, max=10)[1]["jobs"] if j["id"] == second["id"])
    assert again["attempt"] == 2
    status, failed = post(
        api, f"/jobs/{second['id']}/fail", {"lease_token": again["lease_token"], "error": "again"}
    )
    assert (status, failed["state"]) == (200, "dead")

    status, depth = api.call("/queues/default", token=WORKER)
    assert status == 200
    assert (depth["queue"], depth["dead"], depth["paused"]) == ("default", 2, False)


def test_errors_and_limits(api, dsn):
    with Client(dsn) as client:
        client.enqueue("t")
    for body, message in (
        ({"max": 51}, "'max' must be between 1 and 50 (http.max_claim)"),
        ({"max": "3"}, "'max' must be an integer"),
        ({"wait": 21}, "'wait' must be between 0s and 20s (http.max_wait)"),
        ({"lease": 0.5}, "'lease' must be between 1s"),
        ({"lease": "soon"}, "'lease' must be seconds or a duration"),
        ({"worker": None}, "'worker' is required"),
        ({"worker": "x" * 201}, "'worker' is longer than 200 characters"),
        ({"colour": "red"}, "unknown keys ['colour']"),
    ):
        status, answer = claim(api, **body)
        assert status == 400, (body, answer)
        assert message in answer["error"], (body, answer)
    status, answer = claim(api, queue="bad%01name")
    assert status == 400 and "invalid queue name" in answer["error"]
    status, answer = api.call("/queues/default/claim", method="POST", raw=b"{x", token=WORKER)
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = api.call(
        "/queues/default/claim", method="POST", raw=b" " * 70_000, token=WORKER
    )
    assert status == 413 and "http.max_body" in answer["error"]
    assert api.call("/queues/default/claim", token=WORKER)[0] == 405
    # keep-alive: a refusal that left its body unread ends the connection, the next works
    link = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    for token in ("wrong", WORKER, WORKER):
        link.request(
            "POST", "/queues/other/claim", b'{"worker": "k"}', {"Authorization": f"Bearer {token}"}
        )
        response = link.getresponse()
        response.read()
        assert response.status == (401 if token == "wrong" else 200)
        assert (response.getheader("Connection") == "close") == (token == "wrong")
    link.close()
    assert api.call("/jobs/heartbeat", token=WORKER)[0] == 405

    status, answer = post(api, "/jobs/abc/complete", {"lease_token": 1})
    assert status == 400 and "job ids are positive numbers" in answer["error"]
    status, answer = post(api, f"/jobs/{2**63}/complete", {"lease_token": 1})
    assert status == 400 and "job ids are positive numbers" in answer["error"]
    status, answer = post(api, "/jobs/1/complete", {"lease_token": 2**64})
    assert status == 400 and "'lease_token' is required" in answer["error"]
    status, answer = post(api, "/jobs/1/complete", {})
    assert status == 400 and "'lease_token' is required" in answer["error"]
    status, answer = post(api, "/jobs/1/heartbeat", {"lease_token": 1})
    assert status == 400 and "'lease' is required" in answer["error"]
    status, answer = post(api, "/jobs/1/fail", {"lease_token": 1})
    assert status == 400 and "'error' is required" in answer["error"]
    status, answer = post(api, "/jobs/1/fail", {"lease_token": 1, "error": "x", "retry_in": -1})
    assert status == 400 and "'retry_in' must be at least 0s" in answer["error"]
    many = [{"id": n, "lease_token": n} for n in range(1, 1002)]
    status, answer = post(api, "/jobs/heartbeat", {"jobs": many, "lease": 10})
    assert status == 413 and "at most 1000" in answer["error"]
    status, answer = post(api, "/jobs/heartbeat", {"jobs": [], "lease": 10})
    assert status == 400 and "'jobs' is required" in answer["error"]
    assert scalar(dsn, "SELECT count(*) FROM jobqd.jobs WHERE state = 'queued'") == 1


def test_admin_list_retry_cancel_pause_resume(api, dsn):
    with Client(dsn) as client:
        ids = [client.enqueue("t", {"n": n}) for n in range(5)]
        client.enqueue("t", queue="other")
    execute(
        dsn, "UPDATE jobqd.jobs SET state = 'dead', finished_at = now() WHERE id = %s", (ids[0],)
    )

    pages, before = [], None
    while True:
        query = "/jobs?queue=default&limit=2" + (f"&before={before}" if before else "")
        status, page = api.call(query, token=ADMIN)
        assert status == 200
        pages.append([j["id"] for j in page["jobs"]])
        before = page["next_before"]
        if before is None:
            break
    assert pages == [[ids[4], ids[3]], [ids[2], ids[1]], [ids[0]]]
    status, page = api.call("/jobs?state=dead", token=ADMIN)
    assert [j["id"] for j in page["jobs"]] == [ids[0]] and page["next_before"] is None
    assert "state must be one of" in api.call("/jobs?state=lost", token=ADMIN)[1]["error"]
    assert (
        "unknown query parameters ['colour']" in api.call("/jobs?colour=1", token=ADMIN)[1]["error"]
    )
    assert api.call("/jobs?limit=501", token=ADMIN)[0] == 400

    assert post(api, f"/jobs/{ids[0]}/retry", token=ADMIN) == (
        200,
        {"id": ids[0], "state": "queued"},
    )
    assert job_row(dsn, ids[0])[:2] == ("queued", 0)
    assert post(api, f"/jobs/{ids[1]}/cancel", token=ADMIN)[0] == 200
    status, answer = post(api, f"/jobs/{ids[1]}/cancel", token=ADMIN)
    assert status == 409 and f"job {ids[1]} is cancelled and cannot be cancelled" in answer["error"]
    assert post(api, "/jobs/999999/retry", token=ADMIN)[0] == 404

    status, answer = post(api, "/queues/nosuch/pause", token=ADMIN)
    assert status == 404 and '"force": true' in answer["error"]
    status, paused = post(api, "/queues/default/pause", {"duration": "10m"}, ADMIN)
    assert status == 200 and paused["paused"] is True and paused["paused_until"]
    assert paused["paused_by"].startswith("http 127.0.0.1")
    assert claim(api, max=10)[1]["jobs"] == []
    assert api.call("/queues/default", token=WORKER)[1]["paused"] is True
    status, resumed = post(api, "/queues/default/resume", token=ADMIN)
    assert (status, resumed["paused"]) == (200, False)
    assert len(claim(api, max=10)[1]["jobs"]) == 4  # ids[0] retried, 2, 3, 4
    assert post(api, "/queues/later/pause", {"force": True}, ADMIN)[0] == 200


def _waiting_claim(child: HttpChild, results: list, **body) -> threading.Thread:
    def run() -> None:
        began = time.monotonic()
        results.append((*claim(child, **body), time.monotonic() - began))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_long_poll_is_woken_by_notify(api, dsn):
    results: list = []
    thread = _waiting_claim(api, results, wait=15, worker="poller")
    # the waiting claim's first claim has run (it registered its worker) and found nothing
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM jobqd.processes WHERE host = 'poller'"))
    wait_for(
        lambda: scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jobqd http listen'",
        ),
        what="the listener session",
    )
    enqueued = time.monotonic()
    with Client(dsn) as client:
        job_id = client.enqueue("t")
    thread.join(20)
    status, body, took = results[0]
    assert status == 200 and [j["id"] for j in body["jobs"]] == [job_id]
    assert time.monotonic() - enqueued < 5 and took < 14, took  # well before the deadline

    # a delayed job becomes due without a NOTIFY: the listener's due check wakes the waiter
    with Client(dsn) as client:
        later = client.enqueue("t", delay=1.5)
    results.clear()
    _waiting_claim(api, results, wait=15, worker="poller").join(20)
    status, body, took = results[0]
    assert [j["id"] for j in body["jobs"]] == [later] and took < 6, (body, took)

    # nothing comes: the claim answers at its deadline with no jobs
    results.clear()
    _waiting_claim(api, results, wait=1, worker="poller").join(20)
    assert results[0][:2] == (200, {"jobs": []}) and results[0][2] >= 1


def test_waiting_places_are_bounded_and_freed_when_a_client_hangs_up(api, dsn):
    results: list = []
    thread = _waiting_claim(api, results, wait=3, worker="a")
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM jobqd.processes WHERE host = 'a'"))
    status, body = claim(api, wait=3, worker="b")
    assert status == 503 and "1 claims are waiting already (http.max_waiters)" in body["error"]
    assert claim(api, worker="b") == (200, {"jobs": []})  # a claim without wait is served
    thread.join(10)
    assert results[0][:2] == (200, {"jobs": []})

    # a long-poll whose client went away is dropped long before its deadline
    raw = json.dumps({"worker": "gone", "wait": 15}).encode()
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        sock.sendall(
            b"POST /queues/default/claim HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {WORKER}\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM jobqd.processes WHERE host = 'gone'"))
    # max_waiters is 1: a second waiting claim is served only once the first was dropped
    results.clear()
    wait_for(
        lambda: (
            _waiting_claim(api, results, wait=0.1, worker="w").join(10) or results[-1][0] == 200
        ),
        timeout=10,
        what="the hung-up claim to be dropped",
    )
    with Client(dsn) as client:
        job_id = client.enqueue("t")
    status, body = claim(api)
    assert status == 200 and [j["id"] for j in body["jobs"]] == [job_id]
    assert scalar(dsn, "SELECT attempt FROM jobqd.jobs WHERE id = %s", (job_id,)) == 1


def test_one_listener_wakes_by_notify_alone(dsn):
    """In the process: a NOTIFY with no due job wakes the waiter (the due check would not)."""
    wakeups = Wakeups(dsn, "jobqd", application_name="jobqd test", max_waiters=4)
    wakeups.start()
    calls: list[float] = []
    try:
        thread = threading.Thread(
            target=lambda: wakeups.long_poll("q", lambda: calls.append(time.monotonic()) or [], 20)
        )
        thread.start()
        wait_for(lambda: calls and wakeups.listening("q"), what="the waiter and its LISTEN")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_notify(jobqd.queue_channel('q'), '')")
        wait_for(lambda: len(calls) >= 2, timeout=5, what="the NOTIFY to wake the waiter")
        assert calls[1] - calls[0] < 5
    finally:
        wakeups.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_listener_survives_losing_the_database(children, dsn):  # noqa: F811
    """Every session cut and new ones refused, as in a database restart, then back."""
    listening = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'jobqd http listen'"
    with Proxy.to(dsn) as proxy:
        child = children(proxy.dsn(dsn), env=ENV, http=TOKENS)
        results: list = []
        _waiting_claim(child, results, wait=1).join(10)  # the queue's channel is LISTENed
        wait_for(lambda: scalar(dsn, listening), what="the listener session")
        proxy.cut()
        wait_for(lambda: not scalar(dsn, listening), what="the listener session to end")
        status, body = claim(child, wait=1)
        assert status == 503 and body["error"].startswith("database:"), body
        proxy.heal()
        wait_for(lambda: scalar(dsn, listening), timeout=30, what="the listener to reconnect")
        results.clear()
        thread = _waiting_claim(child, results, wait=15, worker="after")
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM jobqd.processes WHERE host = 'after'"))
        with Client(dsn) as client:
            job_id = client.enqueue("t")
        thread.join(20)
        status, body, took = results[0]
        assert [j["id"] for j in body["jobs"]] == [job_id] and took < 10, (body, took)

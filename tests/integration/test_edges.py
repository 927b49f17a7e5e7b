"""Issue 11 (items 2, 4, 7, 8, 9) against a real Postgres: routing by the task's queue,
bundles that always finish, the small wrong answers, names and secrets, and the races that
must not surface."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import timedelta

import psycopg
import pytest
from helpers import scalar, start_worker, wait_for
from test_ctl import as_json, jobqctl
from test_http import HttpChild

from jobqd import Client, Snooze, task
from jobqd.config.settings import parse
from jobqd.maintenance.cron import Cron, on_time
from jobqd.maintenance.pruner import prune
from jobqd.store.sql import queries
from jobqd.tasks import UNKNOWN_TASK, Registry
from jobqd.tasks import registry as global_registry
from jobqd.testing import InlineClient

SQL = queries("jobqd")


@pytest.fixture
def client(dsn):
    with Client(dsn) as c:
        yield c


def publish(conn, name, queue, max_attempts=None):
    """What a worker's sync_definitions writes for one task."""
    conn.execute(
        SQL.tasks_sync,
        {
            "name": name,
            "queue": queue,
            "max_attempts": max_attempts,
            "delivery": None,
            "backoff": None,
        },
    )


# -- item 4: a task's queue is where its jobs go -------------------------------------------------


def test_a_registered_tasks_queue_is_where_its_jobs_go(client):
    task("edges.welcome", queue="emails")(lambda job: None)
    try:
        one = client.enqueue("edges.welcome", {})
        many = client.enqueue_many([("edges.welcome", {}), {"task": "edges.welcome"}])
        _bundle, members = client.enqueue_bundle([("edges.welcome", {})])
        assert {client.get(i).queue for i in [one, *many, *members]} == {"emails"}
        assert client.get(client.enqueue("edges.welcome", queue="other")).queue == "other"
    finally:
        global_registry._tasks.pop("edges.welcome")


def test_an_unimported_task_goes_to_the_queue_workers_published(client, conn, dsn):
    publish(conn, "mail.send", "emails")
    publish(conn, "reports.*", "reports")
    publish(conn, "reports.big.*", "big")
    assert client.get(client.enqueue("mail.send")).queue == "emails"
    assert client.get(client.enqueue("reports.user-1")).queue == "reports"
    assert client.get(client.enqueue("reports.big.x")).queue == "big"  # longest prefix
    assert client.get(client.enqueue("nobody.knows")).queue == "default"
    sql_id = scalar(dsn, "SELECT jobqd.enqueue(queue => NULL, task => 'mail.send')")
    assert client.get(sql_id).queue == "emails"
    ids = scalar(
        dsn,
        "SELECT array_agg(id ORDER BY ord) FROM jobqd.enqueue_many("
        "ARRAY[NULL, 'x'], ARRAY['reports.a', 'mail.send'], ARRAY['{}', '{}']::jsonb[])",
    )
    assert [client.get(i).queue for i in ids] == ["reports", "x"]
    code, out, err = jobqctl("enqueue", "mail.send", dsn=dsn)
    assert code == 0, err
    assert "on queue 'emails'" in out


def test_a_worker_publishes_its_tasks_queues_and_names_its_sessions(db, procs):
    start_worker(procs, db, application_name="edgesapp")
    wait_for(
        lambda: scalar(db, "SELECT count(*) FROM jobqd.tasks WHERE name = 'test.fail'"),
        what="the worker to publish its tasks",
    )
    assert scalar(db, "SELECT queue FROM jobqd.tasks WHERE name = 'test.record'") == "default"
    names = scalar(
        db,
        "SELECT array_agg(application_name) FROM pg_stat_activity"
        " WHERE datname = current_database()",
    )
    assert "edgesapp worker default#0" in names


def test_check_says_where_jobs_of_a_task_go(tmp_path):
    module = tmp_path / "edges_tasks.py"
    module.write_text(
        "from jobqd import task\n@task('x.send', queue='elsewhere')\ndef f(job): pass\n"
    )
    config = tmp_path / "jobqd.yaml"
    config.write_text("database: {url: 'postgresql:///unused'}\nimports: [edges_tasks]\n")
    done = _jobqd("--check", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "does not route jobs yet" not in done.stderr
    assert "jobs enqueued without a queue go there" in done.stderr


# -- item 2: bundles always finish ----------------------------------------------------------------


def bundle_row(conn, bundle_id):
    return conn.execute(
        "SELECT total, succeeded, dead, cancelled, finished_at IS NOT NULL, callback_job_id"
        " FROM jobqd.bundles WHERE id = %s",
        (bundle_id,),
    ).fetchone()


def test_an_empty_bundle_finishes_at_once_with_its_callback(client, conn):
    bundle_id, ids = client.enqueue_bundle([], callback="edges.done", callback_queue="cb")
    assert ids == []
    total, _ok, _dead, _cancelled, finished, callback = bundle_row(conn, bundle_id)
    assert (total, finished) == (0, True)
    job = client.get(callback)
    assert (job.task, job.queue, job.args["bundle"]["total"]) == ("edges.done", "cb", 0)


def test_deleted_and_cancelled_members_count_as_cancelled(client, conn, dsn):
    bundle_id, (a, b) = client.enqueue_bundle([("m", {}), ("m", {})], callback="edges.done")
    assert jobqctl("delete", str(a), dsn=dsn)[0] == 0
    assert bundle_row(conn, bundle_id)[4] is False
    assert client.cancel(b)
    total, _ok, _dead, cancelled, finished, callback = bundle_row(conn, bundle_id)
    assert (total, cancelled, finished) == (2, 2, True)
    assert client.get(callback).args["bundle"]["cancelled"] == 2


def test_a_member_deduplicated_onto_another_job_is_refused(client, conn):
    live = client.enqueue("m", dedup_key="d1")
    with pytest.raises(psycopg.DataError) as caught:
        client.enqueue_bundle([("m", {}), {"task": "m", "dedup_key": "d1"}])
    assert caught.value.sqlstate == "22J02"
    assert f"live job {live}" in str(caught.value)
    assert conn.execute("SELECT count(*) FROM jobqd.bundles").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 1


def test_a_bundle_needs_exactly_its_jobs_from_its_own_transaction(conn):
    with (
        pytest.raises(psycopg.DataError, match="created for 2 jobs but 1 joined"),
        conn.transaction(),
    ):
        bundle_id = conn.execute("SELECT jobqd.create_bundle(2)").fetchone()[0]
        conn.execute("SELECT jobqd.enqueue('q', 't', bundle_id => %s)", (bundle_id,))


def test_the_enqueue_only_role_cannot_add_to_someone_elses_bundle(client, conn, dsn):
    role = f"edges_web_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role}")
    try:
        conn.execute("SELECT jobqd.grant_enqueue(%s)", (role,))
        victim, (_member,) = client.enqueue_bundle([("m", {})], callback="edges.done")
        with psycopg.connect(dsn, autocommit=True) as web:
            web.execute(f"SET ROLE {role}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                web.execute("SELECT jobqd.enqueue('q', 'evil', bundle_id => %s)", (victim,))
            # ...nor as a batch, nor inside a transaction of its own
            with pytest.raises(psycopg.errors.InsufficientPrivilege), web.transaction():
                web.execute(
                    "SELECT * FROM jobqd.enqueue_many(ARRAY['q'], ARRAY['evil'],"
                    " ARRAY['{}']::jsonb[], bundle_id => %s)",
                    (victim,),
                )
            # its own bundles work
            with web.transaction():
                own = web.execute("SELECT jobqd.create_bundle(1)").fetchone()[0]
                web.execute("SELECT jobqd.enqueue('q', 'mine', bundle_id => %s)", (own,))
        assert bundle_row(conn, victim)[:5] == (1, 0, 0, 0, False)
        assert (
            conn.execute("SELECT count(*) FROM jobqd.jobs WHERE task = 'evil'").fetchone()[0] == 0
        )
    finally:
        conn.execute("DROP OWNED BY " + role)
        conn.execute("DROP ROLE " + role)


def test_stuck_and_finished_bundles_are_pruned(client, conn):
    conn.execute(
        "INSERT INTO jobqd.bundles (total, created_at) VALUES (2, now() - interval '10 days')"
    )
    live, _ = client.enqueue_bundle([("m", {})])
    conn.execute(
        "UPDATE jobqd.bundles SET created_at = now() - interval '10 days' WHERE id = %s", (live,)
    )
    settings = parse(
        "retention: {succeeded: 1d}\n", "<test>", {"JOBQD_DATABASE_URL": "postgresql:///x"}
    )
    assert prune(conn, settings)["bundles"] == 1
    assert [r[0] for r in conn.execute("SELECT id FROM jobqd.bundles").fetchall()] == [live]


def test_bundles_in_jobqctl_and_the_json_api(client, dsn, tmp_path):
    bundle_id, (a, _b) = client.enqueue_bundle([("m", {}), ("m", {})], name="imp")
    client.cancel(a)
    listed = as_json("bundles", dsn=dsn)
    assert [(x["id"], x["ended"], x["total"], x["done"]) for x in listed] == [
        (bundle_id, 1, 2, False)
    ]
    shown = as_json("bundle", "show", str(bundle_id), dsn=dsn)
    assert shown["jobs"] == {"cancelled": 1, "queued": 1} and shown["name"] == "imp"
    code, out, _ = jobqctl("bundle", "show", str(bundle_id), dsn=dsn)
    assert code == 0 and "1 of 2" in out
    code, _, err = jobqctl("bundle", "show", "999", dsn=dsn)
    assert code == 1 and "no bundle 999" in err
    child = HttpChild(tmp_path, dsn, token="tok")
    try:
        status, body = child.call(f"/bundles/{bundle_id}", token="tok")
        assert status == 200
        assert (body["total"], body["cancelled"], body["done"]) == (2, 1, False)
        assert body["jobs"] == {"cancelled": 1, "queued": 1}
        assert child.call("/bundles/999", token="tok")[0] == 404
    finally:
        child.close()


# -- item 7: smaller wrong answers ----------------------------------------------------------------


def test_jobqctl_shows_the_effective_attempt_limit(client, conn, dsn):
    publish(conn, "edges.limited", "default", max_attempts=3)
    publish(conn, "edges.route.*", "default", max_attempts=4)
    conn.execute("INSERT INTO jobqd.queues (name, max_attempts) VALUES ('q7', 9)")
    a = client.enqueue("edges.limited")
    b = client.enqueue("edges.route.x")
    c = client.enqueue("edges.other", queue="q7")
    d = client.enqueue("edges.limited", max_attempts=2)
    e = client.enqueue("edges.other", queue="unsynced")
    limits = {j["id"]: j["effective_max_attempts"] for j in as_json("jobs", dsn=dsn)}
    assert [limits[i] for i in (a, b, c, d, e)] == [3, 4, 9, 2, None]
    assert "attempt          0 of 3" in jobqctl("show", str(a), dsn=dsn)[1].replace(":", " ")
    out = jobqctl("jobs", dsn=dsn)[1]
    rows = {line.split()[0]: line.split()[4] for line in out.splitlines()[1:]}
    assert [rows[str(i)] for i in (a, b, c, d, e)] == ["0/3", "0/4", "0/9", "0/2", "0/20"]


def test_pausing_an_unknown_queue_needs_force(dsn, conn, client):
    code, _, err = jobqctl("pause", "nosuchqueue", dsn=dsn)
    assert code == 1 and "--force" in err
    assert conn.execute("SELECT count(*) FROM jobqd.queues").fetchone()[0] == 0
    assert jobqctl("pause", "nosuchqueue", "--force", dsn=dsn)[0] == 0
    client.enqueue("t", queue="known")
    assert jobqctl("pause", "known", dsn=dsn)[0] == 0


def test_inline_client_stops_an_endless_snooze():
    registry = Registry()

    @task("edges.sleepy", registry=registry)
    def sleepy(job):
        raise Snooze(1)

    inline = InlineClient(registry=registry, max_snoozes=5)
    inline.enqueue("edges.sleepy")
    run = inline.runs[0]
    assert (run.state, run.snoozes, run.attempts) == ("queued", 5, 0)


def test_metrics_label_jobs_by_registered_task_or_route():
    registry = Registry()
    task("reports.*", registry=registry)(lambda job: None)
    task("send", registry=registry)(lambda job: None)
    assert registry.metric_label("reports.user-17126") == "reports.*"
    assert registry.metric_label("send") == "send"
    assert registry.metric_label("typo.whatever") == UNKNOWN_TASK


def test_sql_delay_and_idempotency_keys_in_batches_and_bundles(client, conn, dsn):
    job_id = scalar(dsn, "SELECT jobqd.enqueue('q', 't', delay => interval '60 seconds')")
    wait = conn.execute("SELECT run_at - created_at FROM jobqd.jobs WHERE id = %s", (job_id,))
    assert timedelta(seconds=59) < wait.fetchone()[0] <= timedelta(seconds=61)
    with pytest.raises(psycopg.DataError, match="not both"):
        conn.execute("SELECT jobqd.enqueue('q', 't', run_at => now(), delay => '1s')")
    first = client.enqueue_many([{"task": "t", "idempotency_key": "k1"}, ("t", {})])
    again = client.enqueue_many([{"task": "t", "idempotency_key": "k1"}])
    assert again == first[:1]
    _, members = client.enqueue_bundle([{"task": "t", "idempotency_key": "k2"}])
    assert client.get(members[0]).idempotency_key == "k2"


def test_the_reference_config_describes_the_idempotency_window():
    with open(os.path.join(os.path.dirname(__file__), "../../etc/jobqd.yaml")) as f:
        text = f.read()
    line = next(x for x in text.splitlines() if x.strip().startswith("idempotency:"))
    assert "idempotency" in line and "dedup" not in line


# -- item 8: input and secrets --------------------------------------------------------------------


@pytest.mark.parametrize("queue, name", [("", "t"), ("q" * 201, "t"), ("q", ""), ("q", "t" * 201)])
def test_names_are_checked_and_errors_echo_nothing(client, conn, queue, name):
    secret = {"password": "hunter2"}
    for call in (
        lambda: client.enqueue(name, secret, queue=queue),
        lambda: client.enqueue_many([(name, secret)], queue=queue),
        lambda: client.enqueue_bundle([(name, secret)], queue=queue),
    ):
        with pytest.raises(psycopg.DataError) as caught:
            call()
        text = str(caught.value)
        assert caught.value.sqlstate == "22J01"
        assert "1 to 200 characters" in text
        for leak in ("hunter2", "INSERT", "DETAIL", "CONTEXT", "Failing row"):
            assert leak not in text
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT jobqd.enqueue(%s, %s, %s::jsonb)", (queue, name, json.dumps(secret)))
    assert caught.value.diag.sqlstate == "22J01" and caught.value.diag.message_detail is None


def _jobqd(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd or ""), env.get("PYTHONPATH")]))
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "jobqd"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def test_a_malformed_url_never_shows_its_password(tmp_path):
    bad = "postgres//bob:s3cretpw@127.0.0.1/db"
    code, out, err = jobqctl("status", dsn=bad)
    assert code != 0 and "s3cretpw" not in out + err and "malformed" in err
    config = tmp_path / "jobqd.yaml"
    config.write_text(f"database: {{url: '{bad}'}}\nhttp: {{listen: '127.0.0.1:0'}}\n")
    config.chmod(0o600)
    done = _jobqd("-c", str(config), cwd=tmp_path)
    assert done.returncode != 0
    assert "s3cretpw" not in done.stdout + done.stderr
    assert "malformed" in done.stderr


def test_a_config_that_others_can_read_with_a_password_gets_a_warning(tmp_path):
    config = tmp_path / "jobqd.yaml"
    config.write_text("database: {url: 'postgresql://bob:pw@127.0.0.1/db'}\n")
    config.chmod(0o644)
    done = _jobqd("--check", "-c", str(config), cwd=tmp_path)
    assert "every user on this host can read it" in done.stderr and "chmod o-r" in done.stderr
    config.chmod(0o640)
    assert "can read it" not in _jobqd("--check", "-c", str(config), cwd=tmp_path).stderr
    config.write_text("database: {url: '${JOBQD_DATABASE_URL}'}\n")
    config.chmod(0o644)
    assert "can read it" not in _jobqd("--check", "-c", str(config), cwd=tmp_path).stderr


# -- item 9: races that should not surface --------------------------------------------------------


def _race(calls):
    """Run the calls at once on threads; (results, errors)."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def run(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_an_eight_way_race_on_one_idempotency_key_returns_one_job(dsn, conn):
    sessions = [psycopg.connect(dsn, autocommit=True) for _ in range(8)]
    try:
        with Client(dsn, pool_size=8) as client:
            for round_ in range(10):
                key = f"sql-{round_}"
                sql_calls = [
                    lambda s=s, key=key: s.execute(
                        "SELECT jobqd.enqueue('q', 't', idempotency_key => %s)", (key,)
                    ).fetchone()[0]
                    for s in sessions
                ]
                ids, errors = _race(sql_calls)
                assert errors == [] and len(set(ids)) == 1, (errors, ids)
                key = f"client-{round_}"
                client_calls = [
                    lambda key=key: client.enqueue("t", idempotency_key=key) for _ in range(8)
                ]
                ids, errors = _race(client_calls)
                assert errors == [] and len(set(ids)) == 1, (errors, ids)
        per_key = conn.execute(
            "SELECT idempotency_key, count(*) FROM jobqd.jobs GROUP BY 1 HAVING count(*) > 1"
        ).fetchall()
        assert per_key == []
        assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 20
    finally:
        for s in sessions:
            s.close()


CRON = """
cron:
  every-second: {schedule: "* * * * * *", task: edges.tick, misfire: skip}
"""


def test_a_cron_tick_whose_insert_failed_fires_later_under_skip(conn):
    """Inserts fail for longer than the on-time tolerance, as the leader keeps passing; once
    they work again every tick of the failure fires, though `skip` drops late ticks."""
    settings = parse(CRON, "<test>", {"JOBQD_DATABASE_URL": "postgresql:///unused"})
    failing = on_time(settings) + 3  # seconds: 8 with the defaults
    duty = Cron(settings)
    duty.run(conn)  # the entry is first seen: due from now on
    conn.execute(
        "CREATE FUNCTION public.edges_refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'inserts refused' USING ERRCODE = '22023'; END $$;"
        " CREATE TRIGGER edges_refuse BEFORE INSERT ON jobqd.jobs"
        " FOR EACH ROW EXECUTE FUNCTION public.edges_refuse()"
    )
    since = conn.execute("SELECT now()").fetchone()[0]
    until = since + timedelta(seconds=failing)

    def failed_long_enough() -> bool:
        duty.run(conn)  # what the leader does every pass
        return conn.execute("SELECT now() > %s", (until,)).fetchone()[0]

    wait_for(failed_long_enough, timeout=failing + 30, interval=0.2, what="failing cron inserts")
    assert conn.execute("SELECT count(*) FROM jobqd.cron_ticks").fetchone()[0] == 0
    conn.execute("DROP TRIGGER edges_refuse ON jobqd.jobs; DROP FUNCTION public.edges_refuse()")
    duty.run(conn)
    rows = conn.execute("SELECT (args->>'cron_tick')::timestamptz FROM jobqd.jobs ORDER BY 1")
    ticks = [row[0] for row in rows.fetchall()]
    assert len([t for t in ticks if since < t <= until]) == int(failing), ticks
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ticks)]
    assert gaps == [1.0] * (len(ticks) - 1)  # none lost, none twice

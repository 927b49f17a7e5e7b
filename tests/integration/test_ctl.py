"""jobqctl as a subprocess against a real database, with jobs in known states."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import psycopg
import pytest
from helpers import LEDGER_TABLE, scalar, start_worker, wait_for

from jobqd import Client


def jobqctl(
    *args: str, dsn: str | None = None, stdin: str | None = None, env: dict[str, str] | None = None
):
    """Run jobqctl; returns (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQD_")} | (env or {})
    command = [sys.executable, "-m", "jobqd.cli.ctl"]
    if dsn:
        command += ["--dsn", dsn]
    done = subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, input=stdin, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def as_json(*args: str, dsn: str):
    code, out, err = jobqctl(*args, "--json", dsn=dsn)
    assert code == 0, err
    return json.loads(out)


def set_states(conn: psycopg.Connection, ids: list[int], sql: str) -> None:
    conn.execute(f"UPDATE jobqd.jobs SET {sql} WHERE id = ANY(%s)", (ids,))


def test_status_counts_equal_the_table_truth(dsn, conn, workers):
    conn.execute(LEDGER_TABLE)
    with Client(dsn) as client:
        # Queue "mix": states set directly, one group per column of the status table.
        ids = client.enqueue_many([("t", {"i": i}) for i in range(21)], queue="mix")
        client.enqueue_many([("t", {})] * 3, queue="mix", delay=3600)  # scheduled
        set_states(conn, ids[5:7], "attempt = 1, run_at = now() + interval '1 minute'")
        set_states(
            conn,
            ids[7:8],
            "state = 'running', attempt = 1, lease_token = 1, "
            "lease_expires_at = now() + interval '1 minute'",
        )
        set_states(conn, ids[8:12], "state = 'dead', attempt = 3, finished_at = now()")
        set_states(conn, ids[12:18], "state = 'succeeded', attempt = 1, finished_at = now()")
        set_states(
            conn, ids[18:19], "state = 'succeeded', finished_at = now() - interval '2 hours'"
        )
        set_states(conn, ids[19:21], "run_at = now() - interval '90 seconds'")
        # Queue "default": outcomes written by a real worker.
        client.enqueue_many([("test.noop", {})] * 3 + [("test.fail", {})])
        start_worker(workers, dsn)
        wait_for(
            lambda: (
                scalar(
                    dsn,
                    "SELECT count(*) FROM jobqd.jobs WHERE queue = 'default' "
                    "AND state IN ('succeeded', 'dead')",
                )
                == 4
            ),
            what="the worker to finish the default queue",
        )
        client.pause("mix")

    status = as_json("status", dsn=dsn)
    queues = {q["queue"]: q for q in status["queues"]}
    mix = queues["mix"]
    expected = {
        "paused": True,
        "queued": 5 + 2,
        "scheduled": 3,
        "retrying": 2,
        "running": 1,
        "dead": 4,
        "succeeded_1h": 6,
        "per_minute": (6 + 4) / 5,
    }
    assert {key: mix[key] for key in expected} == expected
    assert 90 <= mix["oldest_age"] < 150
    default = queues["default"]
    assert (default["succeeded_1h"], default["dead"], default["queued"]) == (3, 1, 0)
    truth = dict(
        conn.execute(
            "SELECT queue, count(*) FILTER (WHERE state = 'queued' AND run_at <= now()) "
            "FROM jobqd.jobs GROUP BY queue"
        ).fetchall()
    )
    assert {q: queues[q]["queued"] for q in truth} == truth
    assert [p["role"] for p in status["processes"]] == ["worker"]

    code, table, _ = jobqctl("status", dsn=dsn)
    assert code == 0
    lines = table.splitlines()
    assert lines[0].split() == [
        "QUEUE",
        "QUEUED",
        "SCHEDULED",
        "RETRYING",
        "RUNNING",
        "DEAD",
        "OK/1H",
        "OLDEST",
        "JOBS/MIN",
    ]
    row = next(line for line in lines if line.startswith("mix"))
    assert row.split()[:9] == ["mix", "(paused)", "7", "3", "2", "1", "4", "6", row.split()[8]]
    assert row.split()[-1] == "2.0"
    assert all(len(line) <= 100 for line in lines)
    assert "worker" in table and "leader: none" in table


def test_retry_of_dead_jobs_makes_them_run(dsn, conn, workers):
    conn.execute(LEDGER_TABLE)
    with Client(dsn) as client:
        ids = client.enqueue_many([("test.record", {})] * 3)
        single = client.enqueue("test.record", queue="other")
    set_states(conn, [*ids, single], "state = 'dead', attempt = 3, finished_at = now()")

    code, out, err = jobqctl("retry", "--queue", "default", "--state", "dead", "--yes", dsn=dsn)
    assert (code, out.strip()) == (0, "retried 3 dead jobs of queue 'default'"), err
    code, out, _ = jobqctl("retry", "--queue", "default", "--state", "dead", dsn=dsn)
    assert code == 1  # nothing matched any more
    code, out, _ = jobqctl("retry", str(single), "999999", "--json", dsn=dsn)
    assert code == 0
    assert json.loads(out) == {
        "retried": [single],
        "skipped": [{"id": 999999, "reason": "not found"}],
    }
    start_worker(workers, dsn)
    start_worker(workers, dsn, queue="other")
    wait_for(
        lambda: scalar(dsn, "SELECT count(*) FROM public.ledger") == 4, what="retried jobs to run"
    )
    assert scalar(dsn, "SELECT count(*) FROM jobqd.jobs WHERE state = 'succeeded'") == 4

    code, out, err = jobqctl("show", str(single), dsn=dsn)
    assert code == 0 and "state:" in out and "succeeded" in out


def test_show_prints_the_error_history_with_tracebacks(dsn, conn, workers):
    conn.execute(LEDGER_TABLE)
    with Client(dsn) as client:
        job_id = client.enqueue("test.fail", {"why": "testing"})
    start_worker(workers, dsn)
    wait_for(lambda: scalar(dsn, "SELECT state FROM jobqd.jobs") == "dead", what="a dead job")
    code, out, _ = jobqctl("show", str(job_id), dsn=dsn)
    assert code == 0
    assert "errors (3, oldest first):" in out
    assert "attempt 3: ValueError: boom on attempt 3" in out
    assert "Traceback (most recent call last)" in out
    assert '"why": "testing"' in out
    detail = as_json("show", str(job_id), dsn=dsn)
    assert [e["attempt"] for e in detail["errors"]] == [1, 2, 3]


def test_exit_codes_and_messages(dsn):
    code, _, err = jobqctl("status", "--wait", "0", dsn="postgresql://postgres@127.0.0.1:1/nowhere")
    assert code == 3
    assert err.startswith("jobqctl: cannot connect to PostgreSQL at 127.0.0.1:1/nowhere")
    assert len(err.strip().splitlines()) == 1
    code, _, err = jobqctl("show", "424242", dsn=dsn)
    assert (code, err.strip()) == (
        1,
        "jobqctl: no job 424242: check the id with `jobqctl jobs` (it may have been pruned)",
    )
    code, _, err = jobqctl("enqueue", "t", "--args", "{bad json", dsn=dsn)
    assert code == 2 and "--args is not valid JSON" in err
    assert jobqctl("retry", dsn=dsn)[0] == 2
    assert jobqctl("retry", "--queue", "q", "--state", "succeeded", dsn=dsn)[0] == 2
    assert jobqctl("jobs", "--state", "bogus", dsn=dsn)[0] == 2
    assert jobqctl("show", "abc", dsn=dsn)[0] == 2
    assert jobqctl("enqueue", "t", "--delay", "5m", "--run-at", "2030-01-01", dsn=dsn)[0] == 2


def test_no_database_given_and_no_embedded_server_running(tmp_path):
    """With nothing given, jobqctl looks for the embedded server where jobqd keeps it by
    default ($STATE_DIRECTORY first); it never starts one."""
    if os.path.exists("/etc/jobqd.yaml"):
        pytest.skip("/etc/jobqd.yaml exists here: jobqctl would read it")
    code, _, err = jobqctl("status", env={"STATE_DIRECTORY": str(tmp_path)})
    assert code == 2 and err.startswith("jobqctl: no database given: pass -c FILE or --dsn URL")
    assert f"no embedded PostgreSQL runs in {tmp_path}/pgdata either" in err
    assert not (tmp_path / "pgdata").exists()
    config = tmp_path / "jobqd.yaml"
    config.write_text(f"database: {{url: embedded, data_dir: {tmp_path}/pgdata}}\n")
    code, _, err = jobqctl("-c", str(config), "dsn")
    assert code == 3 and err.strip() == (
        f"jobqctl: the embedded PostgreSQL in {tmp_path}/pgdata is not running (it runs while "
        "jobqd does): start the daemon first (jobqd -c FILE), or give another database with "
        "-c FILE, --dsn URL or JOBQD_DATABASE_URL"
    )


def test_dsn_prints_a_url_psql_takes_and_psql_runs_on_it(dsn):
    code, out, err = jobqctl("dsn", dsn=dsn)
    assert code == 0 and err == ""
    with psycopg.connect(out.strip()) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] in dsn
    secret = f"{dsn} password=s3cret" if "://" not in dsn else dsn
    code, out, err = jobqctl("dsn", "--json", dsn=secret)
    document = json.loads(out)
    assert document["from"] == "--dsn" and document["schema"] == "jobqd"
    assert "s3cret" not in out + err
    code, out, _ = jobqctl("psql", "--", "-XtAc", "SELECT 6 * 7", dsn=dsn)
    assert (code, out.strip()) == (0, "42")


def test_migrate_twice_and_dry_run(empty_dsn):
    code, out, _ = jobqctl("migrate", "--dry-run", dsn=empty_dsn)
    assert code == 0 and out.startswith("would apply 0001_init")
    assert jobqctl("status", dsn=empty_dsn)[0] == 1  # no schema yet: says to migrate
    code, out, _ = jobqctl("migrate", dsn=empty_dsn)
    assert code == 0 and "applied 0001_init" in out and "applied 0003_events" in out
    code, out, _ = jobqctl("migrate", dsn=empty_dsn)
    assert (code, out.strip()) == (0, "schema 'jobqd' is up to date: nothing to apply")


def test_queue_operations(dsn, conn):
    code, out, _ = jobqctl("enqueue", "t", "--queue", "q", "--args", '{"n": 1}', dsn=dsn)
    assert code == 0 and out.startswith("enqueued job ")
    ids = [as_json("enqueue", "t", "--queue", "q", "--priority", "-2", dsn=dsn)["id"]]
    ids.append(as_json("enqueue", "t", "--queue", "q", "--delay", "5m", dsn=dsn)["id"])
    assert scalar(dsn, "SELECT priority FROM jobqd.jobs WHERE id = %s", (ids[0],)) == -2

    assert as_json("pause", "q", dsn=dsn) == {"queue": "q", "paused": True}
    assert scalar(dsn, "SELECT paused FROM jobqd.queues WHERE name = 'q'") is True
    assert as_json("resume", "q", dsn=dsn) == {"queue": "q", "paused": False}

    listed = as_json("jobs", "--queue", "q", "--limit", "2", dsn=dsn)
    assert [j["id"] for j in listed] == sorted(ids, reverse=True)

    code, out, _ = jobqctl("cancel", "--queue", "q", "--state", "queued", "--yes", dsn=dsn)
    assert (code, out.strip()) == (0, "cancelled 3 queued jobs of queue 'q'")
    code, out, _ = jobqctl("cancel", "--queue", "q", "--state", "queued", dsn=dsn, stdin="")
    assert code == 1

    running = as_json("enqueue", "t", dsn=dsn)["id"]
    set_states(
        conn,
        [running],
        "state = 'running', lease_token = 1, lease_expires_at = now() + interval '1 minute'",
    )
    code, out, _ = jobqctl("delete", str(ids[0]), str(running), dsn=dsn)
    assert code == 0
    assert out.splitlines() == [
        "deleted 1 of 2 jobs",
        f"  job {running}: is running (running jobs: cancel them first)",
    ]

    assert as_json("events", "on", "q", dsn=dsn)["queues"] == ["q"]
    assert as_json("events", "off", "q", dsn=dsn)["queues"] == []


def test_config_file_cron_and_prune(dsn, conn, tmp_path):
    config = tmp_path / "jobqd.yaml"
    config.write_text(
        f"database: {{url: '{dsn}'}}\n"
        "cron:\n"
        "  nightly:\n"
        "    schedule: '0 3 * * *'\n"
        "    task: reports.nightly\n"
        "retention: {succeeded: 1h}\n"
    )
    code, out, _ = jobqctl("-c", str(config), "cron", "list")
    assert code == 0 and "nightly" in out and "reports.nightly" in out
    code, out, _ = jobqctl("-c", str(config), "cron", "run", "nightly", "--json")
    job_id = json.loads(out)["id"]
    assert scalar(dsn, "SELECT task FROM jobqd.jobs WHERE id = %s", (job_id,)) == "reports.nightly"
    assert jobqctl("-c", str(config), "cron", "run", "nope")[0] == 1
    assert jobqctl("cron", "list", dsn=dsn)[0] == 2  # needs the config's entries

    conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, state, finished_at) VALUES "
        "('default', 'old', 'succeeded', now() - interval '2 hours'), "
        "('default', 'new', 'succeeded', now())"
    )
    pruned = json.loads(jobqctl("-c", str(config), "prune", "--json")[1])
    assert pruned["succeeded"] == 1
    assert scalar(dsn, "SELECT array_agg(task) FROM jobqd.jobs WHERE state = 'succeeded'") == [
        "new"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("queues: {default: {concurrency: lots}}\n")
    code, _, err = jobqctl("-c", str(bad), "status")
    assert code == 2 and "concurrency" in err


def test_bulk_changes_ask_on_a_terminal(dsn, conn):
    with Client(dsn) as client:
        ids = client.enqueue_many([("t", {})] * 2, queue="q")
    set_states(conn, ids, "state = 'dead', finished_at = now()")
    command = [sys.executable, "-m", "jobqd.cli.ctl", "--dsn", dsn, "retry", "--queue", "q"]
    command += ["--state", "dead"]
    for answer, code, dead in (("n\n", 1, 2), ("y\n", 0, 0)):
        leader, follower = pty.openpty()
        os.write(leader, answer.encode())
        done = subprocess.run(command, stdin=follower, capture_output=True, text=True, timeout=60)
        os.close(leader)
        os.close(follower)
        assert done.returncode == code, done.stderr
        assert "retry 2 dead jobs of queue 'q'? [y/N]" in done.stderr
        assert scalar(dsn, "SELECT count(*) FROM jobqd.jobs WHERE state = 'dead'") == dead

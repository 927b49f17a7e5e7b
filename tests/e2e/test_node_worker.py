"""The Node example (examples/node-sql) beside the daemon's Python workers on one queue: every
job run once per attempt (a ledger both write), a SIGKILLed Node worker's jobs reaped and
re-run, its stale token refused, pause and a timed pause honoured, a long job kept by
heartbeats, SIGTERM draining the jobs in flight."""

from __future__ import annotations

import shutil
import signal
import subprocess
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from e2e_daemon import enqueue
from helpers import wait_for
from node_example import NodeExample
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node-sql"
LEASE = 3  # seconds, for the Node and the Python workers alike

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are needed (Debian: nodejs, npm) to run examples/node-sql",
)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """A copy of the example with its dependencies installed from its package-lock.json."""
    copy = tmp_path_factory.mktemp("node-sql") / "node-sql"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("node_modules"))
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=copy,
        check=True,
        capture_output=True,
        timeout=180,
    )
    return copy


def url(dsn: str) -> str:
    """The libpq URL node-postgres takes, from the tests' key=value conninfo."""
    p = conninfo_to_dict(dsn)
    auth = quote(p.get("user", "postgres")) + (
        f":{quote(p['password'])}" if "password" in p else ""
    )
    return f"postgresql://{auth}@{p.get('host', '127.0.0.1')}:{p.get('port', 5432)}/{p['dbname']}"


class NodeWorker(NodeExample):
    """examples/node-sql as a user runs it."""

    def __init__(self, example: Path, dsn: str, name: str, log: Path) -> None:
        settings = {
            "DATABASE_URL": url(dsn),
            "JOBQD_QUEUE": "shared",
            "JOBQD_WORKER": name,
            "JOBQD_LEASE_SECONDS": str(LEASE),
            "JOBQD_POLL_MS": "300",
            "JOBQD_LOG": "debug",
        }
        super().__init__(example, name, log, settings)


def holder_seen(conn: psycopg.Connection, name: str):
    row = conn.execute(
        "SELECT id, heartbeat_at FROM jobqd.processes WHERE role = 'external' AND host = %s",
        (name,),
    ).fetchone()
    return row


def test_node_worker_beside_python_workers(jobqd, ledger, example, tmp_path):
    dsn = ledger
    conn = psycopg.connect(dsn, autocommit=True)
    nodes: list[NodeWorker] = []

    def one(query, params=None):
        return conn.execute(query, params).fetchone()

    try:
        # -- the Node worker alone: a long job kept by heartbeats, then pause -----------------
        n1 = NodeWorker(example, dsn, "node-1", tmp_path / "node-1.log")
        nodes.append(n1)
        long_job = enqueue(dsn, "example.work", {"ms": 4500}, queue="shared")[0]

        def running_long_job():
            assert n1.proc.poll() is None, "node-1 exited"
            return one("SELECT state FROM jobqd.jobs WHERE id = %s", (long_job,))[0] == "running"

        wait_for(
            running_long_job,
            timeout=20,
            what="node-1 to claim the long job",
        )
        one("SELECT jobqd.pause('shared')")
        paused = enqueue(dsn, "example.work", {}, queue="shared", count=3)
        _, since = wait_for(lambda: holder_seen(conn, "node-1"), what="node-1's holder row")

        def claimed_twice_since_pause():
            # Every claim touches the holder row: two claims while paused got nothing.
            seen = holder_seen(conn, "node-1")[1]
            return one("SELECT %s > %s + interval '0.6 seconds'", (seen, since))[0]

        wait_for(claimed_twice_since_pause, timeout=20, what="node-1 to poll while paused")
        assert (
            one("SELECT count(*) FROM jobqd.jobs WHERE id = ANY(%s) AND attempt = 0", (paused,))[0]
            == 3
        ), "a paused queue was claimed from"
        one("SELECT jobqd.resume('shared')")

        def ended(ids):
            return one(
                "SELECT count(*) FROM jobqd.jobs WHERE id = ANY(%s) AND state = 'succeeded'",
                (ids,),
            )[0] == len(ids)

        wait_for(lambda: ended([long_job, *paused]), timeout=30, what="the first jobs to end")
        row = one(
            "SELECT attempt, result->>'worker', errors FROM jobqd.jobs WHERE id = %s", (long_job,)
        )
        assert row == (1, "node-1", []), "the long job was not kept by heartbeats"

        # -- beside the daemon: a timed pause, 1,000 jobs, a SIGKILLed Node worker -------------
        daemon = jobqd(
            {
                "database": {"url": dsn},
                "imports": ["helpers", "protocol_tasks"],
                "log": {"format": "json", "level": "info"},
                "shutdown_timeout": "10s",
                "reaper": {"interval": "1s"},
                "queues": {
                    "shared": {
                        "processes": 1,
                        "concurrency": 8,
                        "lease": f"{LEASE}s",
                        "poll_interval": "300ms",
                        "backoff": {"base": "200ms", "jitter": 0},
                    }
                },
            }
        )
        daemon.booted("worker shared#0")
        one("SELECT jobqd.pause('shared', '2 seconds', 'the test')")
        until = one("SELECT paused_until FROM jobqd.queues WHERE name = 'shared'")[0]
        epoch = until.timestamp()
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT jobqd.enqueue('shared', 'example.work',"
                " jsonb_strip_nulls(jsonb_build_object("
                "  'ms', CASE WHEN g %% 40 = 10 THEN 1500 ELSE 20 END, 'fail_once', g %% 20 = 0,"
                "  'not_before', CASE WHEN g %% 50 = 25 THEN %s::float8 + 1 END)))"
                " FROM generate_series(1, 1000) g ORDER BY g",
                (epoch,),
            ).fetchall()
        ]
        wait_for(
            lambda: one("SELECT count(*) FROM public.ledger WHERE job_id = ANY(%s)", (ids,))[0],
            timeout=20,
            what="the timed pause to end",
        )
        first, late = one(
            "SELECT min(at), min(at) - %s FROM public.ledger WHERE job_id = ANY(%s)", (until, ids)
        )
        assert first >= until, "a job started while the queue was paused"
        assert late.total_seconds() < 5, f"the timed pause ended {late} late"

        wait_for(
            lambda: (
                one(
                    "SELECT count(*) FROM public.ledger WHERE job_id = ANY(%s) AND pid = %s",
                    (ids, n1.proc.pid),
                )[0]
                >= 50
            ),
            timeout=30,
            what="node-1 to run 50 of the jobs",
        )
        holder = holder_seen(conn, "node-1")[0]
        # One of the 1.5 s jobs that node-1 started (its ledger row is there) under a second
        # ago: the kill interrupts work under way.
        interrupted = wait_for(
            lambda: one(
                "SELECT j.id FROM jobqd.jobs j JOIN public.ledger l ON l.job_id = j.id"
                " AND l.attempt = j.attempt AND l.pid = %s"
                " WHERE j.locked_by = %s AND j.state = 'running' AND j.args->>'ms' = '1500'"
                " AND l.at > clock_timestamp() - interval '1 second' LIMIT 1",
                (n1.proc.pid, holder),
            ),
            timeout=30,
            what="node-1 to be running a job",
            interval=0.005,
        )[0]
        n1.proc.send_signal(signal.SIGKILL)
        n1.proc.wait()
        nodes.append(NodeWorker(example, dsn, "node-2", tmp_path / "node-2.log"))
        wait_for(lambda: ended(ids), timeout=60, what="the 1,000 jobs to end")

        jobs = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT id, attempt, args, errors FROM jobqd.jobs WHERE id = ANY(%s)", (ids,)
            ).fetchall()
        }
        runs: dict[int, list[tuple[int, int, datetime]]] = {i: [] for i in ids}
        for job_id, attempt, pid, at in conn.execute(
            "SELECT job_id, attempt, pid, at FROM public.ledger WHERE job_id = ANY(%s)"
            " ORDER BY job_id, attempt",
            (ids,),
        ).fetchall():
            runs[job_id].append((attempt, pid, at))
        lost = "lease expired: external worker 'node-1' stopped renewing it"
        reaped = {
            i for i, (_, _, errors) in jobs.items() if any(e["message"] == lost for e in errors)
        }
        assert reaped, "no job of the killed worker was reaped"

        # Every attempt ran at most once, the last one exactly once; only the killed worker's
        # claims can lack a run (killed between its claim and the task's first line).
        for job_id, (attempt, args, errors) in jobs.items():
            attempts = [a for a, _, _ in runs[job_id]]
            assert len(attempts) == len(set(attempts)), f"an attempt of job {job_id} ran twice"
            if job_id in reaped:
                assert attempts[-1] == attempt and runs[job_id][-1][1] != n1.proc.pid
            else:
                assert attempts == list(range(1, attempt + 1)), (job_id, attempts, attempt)
            if args.get("fail_once"):
                message = errors[0]["message"]
                assert attempt == 2
                assert job_id in reaped or message.endswith("failing the first attempt, as asked")
            elif args.get("not_before"):  # snoozed without spending an attempt
                assert attempt == 1 or job_id in reaped
                assert all(at.timestamp() >= args["not_before"] for _, _, at in runs[job_id])
            else:
                assert attempt == 1 or job_id in reaped
        # The job the kill interrupted ran again elsewhere, on its next attempt.
        assert interrupted in reaped
        (cut, _, _), (again, pid, _) = runs[interrupted][-2:]
        assert runs[interrupted][-2][1] == n1.proc.pid and pid != n1.proc.pid and again == cut + 1
        node_pids = {n.proc.pid for n in nodes}
        by_node = sum(pid in node_pids for r in runs.values() for _, pid, _ in r)
        by_python = sum(pid not in node_pids for r in runs.values() for _, pid, _ in r)
        assert by_node >= 50 and by_python >= 50, (by_node, by_python)
        assert sum(1 for _, args, _ in jobs.values() if args.get("fail_once")) == 50
        assert sum(1 for _, args, _ in jobs.values() if args.get("not_before")) == 20

        # The killed worker's tokens are refused: a late write of a zombie changes nothing.
        tokens = {int(i): int(t) for batch in n1.events("claimed") for i, t in batch["jobs"]}
        job_id = next(i for i in reaped if i in tokens)
        assert (
            conn.execute(
                "SELECT * FROM jobqd.complete(%s, %s)", (job_id, tokens[job_id])
            ).fetchall()
            == []
        )
        assert (
            conn.execute(
                "SELECT * FROM jobqd.heartbeat(%s, %s, '1 minute')", ([job_id], [tokens[job_id]])
            ).fetchall()
            == []
        )

        # -- SIGTERM: node-2 claims no more and finishes what it holds -----------------------
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        n2 = nodes[1]
        slow = enqueue(dsn, "example.work", {"ms": 1500}, queue="shared", count=3)
        wait_for(
            lambda: (
                one(
                    "SELECT count(*) FROM jobqd.jobs WHERE id = ANY(%s) AND state = 'running'",
                    (slow,),
                )[0]
                == 3
            ),
            what="node-2 to claim the slow jobs",
        )
        n2.proc.send_signal(signal.SIGTERM)
        later = enqueue(dsn, "example.work", {}, queue="shared", count=2)
        assert n2.proc.wait(20) == 0
        assert ended(slow)
        assert (
            conn.execute(
                "SELECT state, attempt FROM jobqd.jobs WHERE id = ANY(%s)", (later,)
            ).fetchall()
            == [("queued", 0)] * 2
        )
    finally:
        for node in nodes:
            node.stop()
        conn.close()

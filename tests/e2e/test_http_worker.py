"""The HTTP example (examples/http-worker) beside the daemon's Python workers on one queue:
every job run once per attempt (a ledger both keep), a timed pause set over HTTP honoured by
both, a SIGKILLed HTTP worker's jobs reaped and re-run (kept by heartbeats the second time),
its stale lease tokens refused with 409, and SIGTERM ending a worker's long-poll at once."""

from __future__ import annotations

import json
import shutil
import signal
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from faults import free_port
from helpers import wait_for
from node_example import NodeExample

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "http-worker"
LEASE = 2  # seconds, the HTTP workers' lease: heartbeats every 0.67 s
WORKER_TOKEN, ADMIN_TOKEN = "worker-secret", "admin-secret"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None, reason="node is needed (Debian: nodejs) for examples/http-worker"
)


class HttpWorker(NodeExample):
    """examples/http-worker as a user runs it; its ledger of runs in a file of its own."""

    def __init__(self, base: str, queue: str, name: str, tmp: Path, **env: str) -> None:
        self.ledger = tmp / f"{name}.ledger"
        settings = {
            "JOBQD_URL": base,
            "JOBQD_TOKEN": WORKER_TOKEN,
            "JOBQD_QUEUE": queue,
            "JOBQD_WORKER": name,
            "JOBQD_LEASE_SECONDS": str(LEASE),
            "JOBQD_WAIT_SECONDS": "5",
            "JOBQD_LEDGER_FILE": str(self.ledger),
            "JOBQD_LOG": "debug",
        }
        super().__init__(EXAMPLE, name, tmp / f"{name}.log", {**settings, **env})

    def records(self, event: str | None = None) -> list[dict]:
        """The log's records of `event`, or without one the ledger's runs."""
        return self.events(event) if event else self.events(path=self.ledger)


def call(base: str, path: str, body: dict, token: str) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_worker_beside_python_workers(jobqd, ledger, tmp_path):
    dsn = ledger
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = jobqd(
        {
            "database": {"url": dsn},
            "imports": ["helpers", "protocol_tasks"],
            "log": {"format": "json", "level": "info"},
            "shutdown_timeout": "10s",
            "reaper": {"interval": "1s"},
            "http": {"listen": f"127.0.0.1:{port}", "tokens": {"worker": "JOBQD_WORKER_TOKEN"}},
            "queues": {
                "shared": {
                    "processes": 1,
                    "concurrency": 8,
                    "lease": "3s",
                    "poll_interval": "300ms",
                    "backoff": {"base": "200ms", "jitter": 0},
                }
            },
        },
        env={"JOBQD_WORKER_TOKEN": WORKER_TOKEN, "JOBQD_HTTP_TOKEN": ADMIN_TOKEN},
    )
    conn = psycopg.connect(dsn, autocommit=True)
    workers: list[HttpWorker] = []

    def one(query, params=None):
        return conn.execute(query, params).fetchone()

    try:
        daemon.booted("worker shared#0")
        # -- a victim on a queue only HTTP workers serve: claims, starts, is SIGKILLed ---------
        victim = HttpWorker(base, "solo", "http-victim", tmp_path)
        workers.append(victim)
        held = [one("SELECT jobqd.enqueue('solo', 'example.work', '{\"ms\": 3000}')")[0]]
        held += [one("SELECT jobqd.enqueue('solo', 'example.work', '{\"ms\": 3000}')")[0]]
        wait_for(lambda: len(victim.records()) == 2, timeout=30, what="the victim to start both")
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        workers.append(HttpWorker(base, "solo", "http-solo", tmp_path))

        # -- a timed pause over HTTP, then 1,000 jobs for Python and two HTTP workers ----------
        status, paused = call(base, "/queues/shared/pause", {"duration": "2s"}, ADMIN_TOKEN)
        assert status == 200 and paused["paused"], paused
        until = datetime.fromisoformat(paused["paused_until"])
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT jobqd.enqueue('shared', 'example.work',"
                " jsonb_strip_nulls(jsonb_build_object('ms', 20, 'fail_once', g %% 20 = 0,"
                "  'not_before', CASE WHEN g %% 50 = 25 THEN %s::float8 + 1 END)))"
                " FROM generate_series(1, 1000) g ORDER BY g",
                (until.timestamp(),),
            ).fetchall()
        ]
        workers += [HttpWorker(base, "shared", f"http-{n}", tmp_path) for n in (1, 2)]

        def ended(job_ids: list[int]) -> bool:
            return one(
                "SELECT count(*) FROM jobqd.jobs WHERE id = ANY(%s) AND state = 'succeeded'",
                (job_ids,),
            )[0] == len(job_ids)

        wait_for(lambda: ended(ids + held), timeout=60, what="every job to end")

        # -- the ledger: the daemon's table and the HTTP workers' files ------------------------
        runs: dict[int, list[tuple[int, int, float]]] = {}
        for job_id, attempt, pid, at in conn.execute(
            "SELECT job_id, attempt, pid, extract(epoch FROM at)::float8 FROM public.ledger"
        ).fetchall():
            runs.setdefault(job_id, []).append((attempt, pid, at))
        for worker in workers:
            for record in worker.records():
                runs.setdefault(record["job_id"], []).append(
                    (record["attempt"], record["pid"], record["at"])
                )
        jobs = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT id, attempt, args, errors FROM jobqd.jobs WHERE id = ANY(%s)",
                (ids + held,),
            ).fetchall()
        }
        for job_id, (attempt, _, errors) in jobs.items():
            attempts = sorted(a for a, _, _ in runs[job_id])
            assert attempts == list(range(1, attempt + 1)), (job_id, attempts, errors)
        for job_id in ids:
            attempt, args, errors = jobs[job_id]
            assert attempt == (2 if args.get("fail_once") else 1), (job_id, attempt, errors)
            if args.get("fail_once"):  # failed, then retried after the queue's backoff
                assert errors[0]["message"].endswith("failing the first attempt, as asked")
            assert all(at >= until.timestamp() for _, _, at in runs[job_id]), "ran while paused"
            if args.get("not_before"):  # snoozed, its attempt not spent
                assert all(at >= args["not_before"] for _, _, at in runs[job_id])
        http_pids = {w.proc.pid for w in workers[2:]}
        by_http = sum(pid in http_pids for i in ids for _, pid, _ in runs[i])
        by_python = sum(pid not in http_pids for i in ids for _, pid, _ in runs[i])
        assert by_http >= 50 and by_python >= 50, (by_http, by_python)
        first = min(at for i in ids for _, _, at in runs[i])
        assert first - until.timestamp() < 5, "the timed pause ended late"

        # -- the victim's jobs: reaped, re-run elsewhere, kept by heartbeats ---------------------
        lost = "lease expired: external worker 'http-victim' stopped renewing it"
        for job_id in held:
            attempt, _, errors = jobs[job_id]
            assert attempt == 2 and [e["message"] for e in errors] == [lost], (job_id, errors)
            assert [pid for _, pid, _ in sorted(runs[job_id])] == [
                victim.proc.pid,
                workers[1].proc.pid,
            ]
        tokens = {i: t for claim in victim.records("claimed") for i, t in claim["jobs"]}
        status, answer = call(
            base, f"/jobs/{held[0]}/complete", {"lease_token": tokens[held[0]]}, WORKER_TOKEN
        )
        assert status == 409 and answer["error"].startswith(
            f"lease lost: job {held[0]} is succeeded"
        )
        status, answer = call(
            base,
            "/jobs/heartbeat",
            {"lease": 5, "jobs": [{"id": held[1], "lease_token": tokens[held[1]]}]},
            WORKER_TOKEN,
        )
        assert (status, answer["lost"]) == (200, [held[1]])

        # -- SIGTERM: an idle worker's long-poll is cut and it exits at once -------------------
        idle = workers[2]
        began = datetime.now(UTC)
        idle.proc.send_signal(signal.SIGTERM)
        assert idle.proc.wait(10) == 0
        assert (datetime.now(UTC) - began).total_seconds() < 5
        assert idle.records("stopped")
        complaints = [r for r in daemon.logs() if r.get("role") == "http" and r["level"] != "INFO"]
        assert complaints == [], complaints
        printed = daemon.log_path.read_text(errors="replace").splitlines()
        assert not [line for line in printed if line.startswith("Traceback")]  # not logged
    finally:
        for worker in workers:
            worker.stop()
        conn.close()

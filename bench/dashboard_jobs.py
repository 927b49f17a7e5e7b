"""The dashboard's jobs list at 1,000,000 jobs: latency of real HTTP requests, per filter.

A fresh database gets N jobs in one generate_series insert (most succeeded, some dead,
cancelled, queued and running; five queues, one of them rare; twenty tasks), then VACUUM
ANALYZE, as autovacuum would leave it. `jobqctl dashboard` serves it (a subprocess, read-only)
and this script requests the jobs list with several filters, first pages and deep pages
(a random keyset cursor), and walks "Older" links; it prints p50/p95 per case and overall
and writes them as JSON. The target is p95 under 200 ms.

    python bench/dashboard_jobs.py --jobs 1000000 --requests 30

Needs PostgreSQL (BENCH_DSN, default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd.store.migrate import migrate

TARGET_P95_MS = 200.0
FILL = """
INSERT INTO jobqd.jobs (queue, task, args, state, attempt, run_at, created_at, started_at,
                        finished_at, lease_expires_at, lease_token, last_error)
SELECT q.queue, 'task.' || (i %% 20), jsonb_build_object('user_id', i, 'note', 'order ' || i),
       s.state, CASE WHEN s.state = 'queued' THEN 0 ELSE 1 END,
       t.at, t.at, CASE WHEN s.state <> 'queued' THEN t.at END,
       CASE WHEN s.state IN ('succeeded', 'dead', 'cancelled') THEN t.at + interval '1 s' END,
       CASE WHEN s.state = 'running' THEN now() + interval '1 hour' END,
       CASE WHEN s.state = 'running' THEN i END,
       CASE WHEN s.state = 'dead' THEN 'ValueError: payment ' || i || ' declined' END
  FROM generate_series(1, %(n)s) AS i
 CROSS JOIN LATERAL (SELECT now() - (%(n)s - i) * interval '50 ms' AS at) t
 CROSS JOIN LATERAL (SELECT CASE
        WHEN i <= %(n)s / 50 THEN 'billing'
        WHEN i %% 1000 = 7 THEN 'rare'
        WHEN i %% 20 = 1 THEN 'reports'
        WHEN i %% 4 = 0 THEN 'emails'
        ELSE 'default' END AS queue) q
 CROSS JOIN LATERAL (SELECT CASE
        WHEN i > %(n)s - %(n)s / 20 AND i %% 5 <> 0 THEN 'queued'
        WHEN i > %(n)s - 300 THEN 'running'
        WHEN i <= %(n)s / 50 AND i %% 2 = 0 THEN 'dead'
        WHEN i %% 31 = 0 AND i <= %(n)s / 2 THEN 'dead'
        WHEN i %% 97 = 0 THEN 'cancelled'
        ELSE 'succeeded' END AS state) s
"""
# The backlog (queued) is among the newest jobs, as a queue that fell behind has it. Jobs
# died now and then in the older half (1 in 31) and not since, as in a system that was fixed;
# cancelled ~1%, the rest succeeded. Queue `billing` is an incident long ago: the oldest 2% of
# the jobs, half of them dead, with nearly a million newer jobs above.


def _dsn_for(base: str, dbname: str) -> str:
    params = conninfo_to_dict(base)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, target: str) -> tuple[float, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    began = time.perf_counter()
    connection.request("GET", target)
    response = connection.getresponse()
    body = response.read().decode()
    took = (time.perf_counter() - began) * 1000
    connection.close()
    if response.status != 200:
        raise SystemExit(f"GET {target}: HTTP {response.status}")
    return took, body


_NEXT = re.compile(r'href="(/dashboard/jobs\?[^"]*before=\d+[^"]*)" rel="next"')
_ROW = re.compile(r'<a href="/dashboard/jobs/\d+">')


def cases(n: int) -> list[tuple[str, dict[str, str], bool]]:
    """(name, filters, deep): deep cases start at a random keyset cursor in the table."""
    return [
        ("newest, no filter", {}, False),
        ("deep page, no filter", {}, True),
        ("state=dead", {"state": "dead"}, False),
        ("state=dead, deep", {"state": "dead"}, True),
        ("queue=emails state=dead, deep", {"queue": "emails", "state": "dead"}, True),
        ("state=cancelled queue=reports", {"state": "cancelled", "queue": "reports"}, False),
        ("queue=billing state=dead (old incident)", {"queue": "billing", "state": "dead"}, False),
        ("queue=billing, any state (old)", {"queue": "billing"}, False),
        ("state=queued", {"state": "queued"}, False),
        ("state=running", {"state": "running"}, False),
        ("queue=rare (0.1%)", {"queue": "rare"}, False),
        ("queue=rare, deep", {"queue": "rare"}, True),
        ("task=task.8 queue=emails, deep", {"task": "task.8", "queue": "emails"}, True),
        ("text 'declined' (in errors)", {"q": "declined"}, False),
        ("text 'order 4242\"' (one job)", {"q": 'order 4242"'}, False),
        ("state=succeeded queue=emails, deep", {"state": "succeeded", "queue": "emails"}, True),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=30, help="per case")
    parser.add_argument("--walk", type=int, default=20, help="Older links followed per walk")
    parser.add_argument("--out", type=Path, default=Path("dashboard-jobs-result.json"))
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument(
        "--drop-index",
        action="store_true",
        help="measure without jobs_ended_browse (migration 0009), for comparison",
    )
    args = parser.parse_args()
    base = os.environ.get("BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_dashboard_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = _dsn_for(base, name)
    proc = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, "jobqd")
            began = time.monotonic()
            print(f"inserting {args.jobs:,} jobs…", file=sys.stderr, flush=True)
            conn.execute(FILL, {"n": args.jobs})
            if args.drop_index:
                conn.execute("DROP INDEX jobqd.jobs_ended_browse")
            conn.execute("VACUUM ANALYZE jobqd.jobs")
            print(f"  done in {time.monotonic() - began:.1f}s", file=sys.stderr)
            states = dict(conn.execute("SELECT state, count(*) FROM jobqd.jobs GROUP BY 1"))
            print(f"  states: {states}", file=sys.stderr)
        port = _free_port()
        command = [sys.executable, "-m", "jobqd.cli.ctl", "--dsn", dsn, "dashboard"]
        proc = subprocess.Popen(
            [*command, "--listen", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True
        )
        print(proc.stderr.readline().strip(), file=sys.stderr)
        rng = random.Random(16)
        _get(port, "/dashboard/jobs")  # templates compiled, sessions open
        results = {}
        every: list[float] = []
        for label, filters, deep in cases(args.jobs):
            times, rows, partial = [], 0, 0
            for _ in range(args.requests):
                query = dict(filters)
                if deep:
                    query["before"] = str(rng.randint(args.jobs // 10, args.jobs))
                took, body = _get(port, "/dashboard/jobs?" + urlencode(query))
                times.append(took)
                rows += len(_ROW.findall(body))
                partial += "Searched down to job" in body
            every += times
            results[label] = {**_summary(times, rows / len(times)), "partial": partial}
            _print(label, results[label])
        for label, filters in (
            ("walk Older, state=dead", {"state": "dead"}),
            ("walk Older, queue=emails", {"queue": "emails"}),
        ):
            times, target = [], "/dashboard/jobs?" + urlencode(filters)
            for _ in range(args.walk):
                took, body = _get(port, target)
                times.append(took)
                found = _NEXT.search(body)
                if not found:
                    break
                target = found.group(1).replace("&amp;", "&")
            every += times
            results[label] = _summary(times, 50.0)
            _print(label, results[label])
        overall = _summary(every, 0)
        print(
            f"{'ALL REQUESTS':40} p50 {overall['p50_ms']:7.1f} ms  p95 {overall['p95_ms']:7.1f} ms"
            f"  ({len(every)} requests; target p95 < {TARGET_P95_MS:.0f} ms)"
        )
        document = {
            "jobs": args.jobs,
            "cases": results,
            "overall": overall,
            "target_p95_ms": TARGET_P95_MS,
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")
        return 0 if overall["p95_ms"] < TARGET_P95_MS else 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        if not args.keep:
            with psycopg.connect(base, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _summary(times: list[float], rows: float) -> dict[str, float]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "p50_ms": statistics.median(ordered),
        "p95_ms": p95,
        "max_ms": ordered[-1],
        "requests": len(ordered),
        "rows_per_page": rows,
    }


def _print(label: str, summary: dict[str, float]) -> None:
    partial = summary.get("partial")
    print(
        f"{label:40} p50 {summary['p50_ms']:7.1f} ms  p95 {summary['p95_ms']:7.1f} ms"
        f"  max {summary['max_ms']:7.1f} ms  rows/page {summary['rows_per_page']:5.1f}"
        + (f"  stopped at the budget {partial}/{summary['requests']}" if partial else ""),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

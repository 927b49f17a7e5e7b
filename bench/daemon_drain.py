"""Drain benchmark of the real daemon, for comparing code trees side by side in one run.

Each tree is a directory with a jobqd checkout and a virtualenv (`TREE/.venv`). For every
repetition and every tree, in turn (A B A B ...), a fresh database gets N no-op jobs; then
`python -m jobqd -c CONFIG` of that tree drains them with P worker processes x C slots.
Throughput is N over the span from the first claim to the last finish, read from the jobs
table, so the daemon's start-up is not counted. Prints one line per run, a summary with
medians and each tree's ratio to the first, and writes the figures as JSON.

    python bench/daemon_drain.py --n 50000 --procs 2 --concurrency 50 --reps 3 OLD_TREE NEW_TREE

Needs PostgreSQL (BENCH_DSN, default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

TASKS = """from jobqd import task


@task("bench.noop")
def noop(job):
    return None
"""

CONFIG = """database: {{url: "{dsn}"}}
imports: [bench_noop_tasks]
log: {{format: json, level: warning}}
queues:
  default: {{processes: {procs}, concurrency: {concurrency}}}
"""


def _dsn_for(base: str, dbname: str) -> str:
    params = conninfo_to_dict(base)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def drain_once(tree: Path, base_dsn: str, n: int, procs: int, concurrency: int) -> float:
    """One drain of `n` jobs by the daemon of `tree`; returns jobs/s."""
    python = tree / ".venv" / "bin" / "python"
    name = f"bench_drain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = _dsn_for(base_dsn, name)
    try:
        with tempfile.TemporaryDirectory(prefix="jobqd-drain-") as tmp:
            home = Path(tmp)
            (home / "bench_noop_tasks.py").write_text(TASKS)
            config = home / "jobqd.yaml"
            config.write_text(CONFIG.format(dsn=dsn, procs=procs, concurrency=concurrency))
            env = {**os.environ, "PYTHONPATH": str(home)}
            subprocess.run(
                [str(python), "-m", "jobqd.cli.ctl", "--dsn", dsn, "migrate"],
                check=True,
                env=env,
                cwd=home,  # not this checkout: `-m` would import the jobqd beside the cwd
                capture_output=True,
            )
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT jobqd.enqueue('default', 'bench.noop') FROM generate_series(1, %s)",
                    (n,),
                )
                conn.execute("VACUUM ANALYZE jobqd.jobs")
                log_file = (home / "daemon.log").open("wb")
                daemon = subprocess.Popen(
                    [str(python), "-m", "jobqd", "-c", str(config)],
                    env=env,
                    cwd=home,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
                try:
                    deadline = time.monotonic() + 600
                    while True:
                        left = conn.execute(
                            "SELECT count(*) FROM jobqd.jobs WHERE state IN ('queued', 'running')"
                        ).fetchone()[0]
                        if left == 0:
                            break
                        if daemon.poll() is not None or time.monotonic() > deadline:
                            log = (home / "daemon.log").read_text(errors="replace")[-2000:]
                            raise RuntimeError(f"drain did not finish ({left} left):\n{log}")
                        time.sleep(0.2)
                finally:
                    daemon.send_signal(signal.SIGTERM)
                    daemon.wait(timeout=60)
                done, span = conn.execute(
                    "SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at))"
                    "  FROM jobqd.jobs WHERE state = 'succeeded'"
                ).fetchone()
                if done != n:
                    raise RuntimeError(f"{done} of {n} jobs succeeded")
                return n / float(span)
    finally:
        with psycopg.connect(base_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts with a .venv each")
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    base = os.environ.get("BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    results: dict[str, list[float]] = {str(t): [] for t in args.trees}
    for rep in range(1, args.reps + 1):
        for tree in args.trees:
            rate = drain_once(tree, base, args.n, args.procs, args.concurrency)
            results[str(tree)].append(rate)
            print(f"rep {rep}/{args.reps} {tree}: {rate:,.0f} jobs/s", flush=True)
    first = statistics.median(results[str(args.trees[0])])
    print(f"\n{args.procs} x {args.concurrency}, {args.n:,} jobs, median of {args.reps}:")
    for tree, rates in results.items():
        median = statistics.median(rates)
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
        print(f"  {tree}: {median:,.0f} jobs/s ({spread}), {median / first:.3f}x the first")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"trees": list(results)}, "results": results},
                default=str,
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

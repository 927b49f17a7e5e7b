"""Enqueue throughput against the database's own floor, measured side by side in one run.

- single: one job per call and per commit, through the SQL function (what any language
  calls) and through Client.enqueue, against a bare one-row INSERT + commit into the same
  jobs table from the same driver (no function, no NOTIFY), with and without RETURNING id
  (an enqueue has to return the id, so that is the like-for-like floor);
- bulk: Client.enqueue_many against COPY of the same rows into the same table.

Rounds alternate between the two sides so that noise on a shared machine hits both alike;
the figure that matters is the ratio of medians. Usage:

    python bench/enqueue.py [--dsn URL] [--single N] [--bulk N] [--rounds R]

The database named by --dsn (default: a scratch database `jobqd_bench_enqueue` on
127.0.0.1:5432, created if missing) gets a fresh jobqd schema.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import psycopg

from jobqd import Client
from jobqd.store.migrate import migrate

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DB = "jobqd_bench_enqueue"


def prepare(dsn: str | None) -> str:
    if dsn:
        target = dsn
    else:
        with psycopg.connect(DEFAULT_SERVER, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DEFAULT_DB} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {DEFAULT_DB}")
        target = DEFAULT_SERVER.rsplit("/", 1)[0] + "/" + DEFAULT_DB
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS jobqd CASCADE")
        migrate(conn, "jobqd")
    return target


def rate(n: int, run: Callable[[], None], reset: Callable[[], None]) -> float:
    reset()
    began = time.perf_counter()
    run()
    return n / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--single", type=int, default=2000)
    parser.add_argument("--bulk", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dsn = prepare(args.dsn)
    client = Client(dsn)
    payload = json.dumps({"user_id": 7})
    sides = ("insert", "returning", "sql", "enqueue", "copy", "many")
    results: dict[str, list[float]] = {k: [] for k in sides}

    with psycopg.connect(dsn, autocommit=True) as conn:

        def reset() -> None:
            conn.execute("TRUNCATE jobqd.jobs")

        def bare_inserts() -> None:
            for _ in range(args.single):
                conn.execute(
                    "INSERT INTO jobqd.jobs (queue, task, args) VALUES (%s, %s, %s::jsonb)",
                    ("default", "send_welcome", payload),
                )

        def bare_inserts_returning() -> None:
            for _ in range(args.single):
                conn.execute(
                    "INSERT INTO jobqd.jobs (queue, task, args) VALUES (%s, %s, %s::jsonb)"
                    " RETURNING id",
                    ("default", "send_welcome", payload),
                ).fetchone()

        def sql_enqueues() -> None:
            for _ in range(args.single):
                conn.execute(
                    "SELECT jobqd.enqueue(%s, %s, %s::jsonb)",
                    ("default", "send_welcome", payload),
                ).fetchone()

        def enqueues() -> None:
            for _ in range(args.single):
                client.enqueue("send_welcome", {"user_id": 7})

        def copy_rows() -> None:
            statement = "COPY jobqd.jobs (queue, task, args) FROM STDIN"
            with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
                for _ in range(args.bulk):
                    copy.write_row(("default", "send_welcome", payload))

        def enqueue_many() -> None:
            client.enqueue_many([("send_welcome", {"user_id": 7})] * args.bulk)

        for _ in range(args.rounds):
            results["insert"].append(rate(args.single, bare_inserts, reset))
            results["returning"].append(rate(args.single, bare_inserts_returning, reset))
            results["sql"].append(rate(args.single, sql_enqueues, reset))
            results["enqueue"].append(rate(args.single, enqueues, reset))
            results["copy"].append(rate(args.bulk, copy_rows, reset))
            results["many"].append(rate(args.bulk, enqueue_many, reset))
    client.close()

    med = {k: statistics.median(v) for k, v in results.items()}
    for name, label in (
        ("insert", "bare INSERT + commit, 1 row"),
        ("returning", "bare INSERT RETURNING id"),
        ("sql", "SELECT jobqd.enqueue(...)"),
        ("enqueue", "Client.enqueue, 1 job"),
        ("copy", "COPY"),
        ("many", "Client.enqueue_many"),
    ):
        values = results[name]
        print(
            f"{label:32} median {med[name]:9,.0f} jobs/s "
            f"(range {min(values):,.0f}-{max(values):,.0f}, n={len(values)})"
        )
    for name, label in (("sql", "SQL enqueue"), ("enqueue", "Client.enqueue")):
        print(
            f"{label} / bare insert: {med[name] / med['insert']:.2f}"
            f" (/ INSERT RETURNING id: {med[name] / med['returning']:.2f})"
        )
    print(f"enqueue_many / COPY: {med['many'] / med['copy']:.2f}")


if __name__ == "__main__":
    main()

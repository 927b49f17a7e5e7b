"""Database preparation before the workers start: wait for the database with backoff, refuse a
transaction-mode pooler, apply the migrations.

It runs in a helper process (jobqd.daemon.helper), so the master keeps supervising (the http
child answers /healthz, stop signals work) however long the database takes, and no
connection is ever opened in the master. Progress goes to the master as `progress` messages
({"state": "waiting for the database: ..."} or {"state": "migrating"}); the verdict is
{"ok": true} or {"ok": false, "error": ..., "exit": code}, where an `exit` of null means
"try again" (the database went away in the middle).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import psycopg

from jobqd.backoff import Backoff
from jobqd.config.settings import DatabaseSettings
from jobqd.daemon.helper import Report
from jobqd.errors import EXIT_CONFIG, EXIT_FAILURE, DatabaseUnavailable, MigrationError
from jobqd.maintenance.leader import PoolerDetected, ensure_direct
from jobqd.store import connections as db
from jobqd.store import migrate as migrations

log = logging.getLogger("jobqd.master")

DATABASE_WAIT = Backoff(kind="exponential", base=1.0, cap=10.0, jitter=0.1)
"""Delay between attempts to reach the database at start: 1 s, 2 s, 4 s ... 10 s."""

MIGRATING = "migrating"
"""The `progress` state while migrations run (or wait for another node's)."""


def resolve_database(database: DatabaseSettings) -> str:
    """The conninfo the children connect with. Starts the embedded server when configured:
    that happens in the master, whose process owns the server's lifetime."""
    if database.is_embedded:
        fresh = not os.path.exists(os.path.join(database.data_dir, "PG_VERSION"))
        log.info(
            "starting the embedded PostgreSQL in %s%s",
            database.data_dir,
            " (first start: creating it takes a few seconds)" if fresh else "",
        )
    return db.resolve_url(database.url, database.data_dir)


def prepare(
    dsn: str,
    schema: str,
    *,
    migrate: bool,
    report: Report,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, object]:
    """Wait until the database answers on a direct session, then migrate (unless told not
    to); returns the verdict. Runs in the helper."""
    attempt = 0
    while True:
        try:
            ensure_direct(dsn, application_name="jobqd master prepare")
            break
        except PoolerDetected as exc:
            return {"ok": False, "error": str(exc), "exit": EXIT_CONFIG}
        except DatabaseUnavailable as exc:
            attempt += 1
            delay = DATABASE_WAIT.delay(attempt)
            log.warning("waiting for the database: %s; retrying in %.0fs", exc, delay)
            report({"kind": "progress", "state": f"waiting for the database: {exc}"})
            sleep(delay)
    if not migrate:
        log.info("not applying migrations (--no-migrate or database.migrate: false)")
        return {"ok": True}
    report({"kind": "progress", "state": MIGRATING})
    try:
        with db.connect(
            dsn, application_name="jobqd master migrate", statement_timeout_ms=None
        ) as conn:
            _migrate(conn, schema)
    except MigrationError as exc:
        return {"ok": False, "error": f"cannot migrate the database: {exc}", "exit": EXIT_FAILURE}
    except (DatabaseUnavailable, psycopg.OperationalError) as exc:
        return {"ok": False, "error": f"lost the database while migrating: {exc}", "exit": None}
    return {"ok": True}


def _migrate(conn: psycopg.Connection, schema: str) -> None:
    todo = migrations.pending(conn, schema)
    if not todo:
        log.info("schema %s is up to date", schema)
        return
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
    log.info("migrating schema %s: %s", schema, names)
    migrations.migrate(conn, schema)
    log.info("migrations applied")

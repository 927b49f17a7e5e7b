"""Database preparation, the master's only database work: before it forks anything, resolve
the database (starting the embedded server if configured), wait for it with backoff, apply
the migrations. The connection is closed before this returns: no connection crosses a fork."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import psycopg

from jobqd.backoff import Backoff
from jobqd.config.settings import DatabaseSettings
from jobqd.errors import DatabaseUnavailable
from jobqd.observe import sdnotify
from jobqd.store import connections as db
from jobqd.store import migrate as migrations

log = logging.getLogger("jobqd.master")

DATABASE_WAIT = Backoff(kind="exponential", base=1.0, cap=10.0, jitter=0.1)
"""Delay between attempts to reach the database at start: 1 s, 2 s, 4 s ... 10 s."""


def prepare_database(
    database: DatabaseSettings, *, migrate: bool, sleep: Callable[[float], bool]
) -> str | None:
    """The conninfo the children connect with, once the schema is up to date; None if
    `sleep(seconds)`, which waits between attempts, returns True: told to stop meanwhile."""
    if database.is_embedded:
        fresh = not os.path.exists(os.path.join(database.data_dir, "PG_VERSION"))
        log.info(
            "starting the embedded PostgreSQL in %s%s",
            database.data_dir,
            " (first start: creating it takes a few seconds)" if fresh else "",
        )
        sdnotify.notify("STATUS=starting the embedded PostgreSQL")
    dsn = db.resolve_url(database.url, database.data_dir)
    if not migrate:
        log.info("not applying migrations (--no-migrate or database.migrate: false)")
        return dsn
    attempt = 0
    while True:
        try:
            conn = db.connect(
                dsn, application_name="jobqd master migrate", statement_timeout_ms=None
            )
        except DatabaseUnavailable as exc:
            attempt += 1
            delay = DATABASE_WAIT.delay(attempt)
            log.warning("waiting for the database: %s; retrying in %.0fs", exc, delay)
            sdnotify.notify("STATUS=waiting for the database")
            if sleep(delay):
                return None
            continue
        with conn:
            _migrate(conn, database.schema)
        return dsn


def _migrate(conn: psycopg.Connection, schema: str) -> None:
    todo = migrations.pending(conn, schema)
    if not todo:
        log.info("schema %s is up to date", schema)
        return
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
    log.info("migrating schema %s: %s", schema, names)
    sdnotify.notify("STATUS=migrating")
    with sdnotify.long_start_step("migrating (or waiting for another node's)"):
        migrations.migrate(conn, schema)
    log.info("migrations applied")

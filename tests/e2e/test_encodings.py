"""Database encodings (issue 11, item 6): a SQL_ASCII database is refused at once, by the
migration runner and by the daemon, with a message that names the encoding and the fix; a
database in another real encoding (LATIN1) works like a UTF8 one, start after start."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from e2e_daemon import daemon_env

from jobqd.client import Client
from jobqd.errors import MigrationError
from jobqd.store import migrate as runner


@pytest.fixture
def database_in(databases) -> Iterator[Callable[[str], str]]:
    """`database_in("SQL_ASCII")`: a new empty database in that encoding; dropped afterwards."""
    made: list[str] = []

    def create(encoding: str) -> str:
        name = f"jobqd_test_{databases.run_id}_{encoding.lower()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(databases.server_dsn, autocommit=True) as conn:
            conn.execute(
                f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
                " TEMPLATE template0"
            )
        made.append(name)
        return databases.url(name)

    yield create
    for name in made:
        databases.drop(name)


def _schema_exists(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'jobqd'").fetchone()
    return bool(row and row[0])


def test_sql_ascii_is_refused_at_the_first_migrate_and_every_later_one(database_in):
    dsn = database_in("SQL_ASCII")
    for _ in range(2):
        with psycopg.connect(dsn, autocommit=True) as c, pytest.raises(MigrationError) as refused:
            runner.migrate(c, "jobqd")
        message = str(refused.value)
        assert "SQL_ASCII" in message and "ENCODING 'UTF8' TEMPLATE template0" in message
        assert "changed after it was applied" not in message
        assert not _schema_exists(dsn), "nothing is created in a refused database"


def _start_daemon(tmp_path: Path, dsn: str, run: int) -> subprocess.CompletedProcess[str]:
    config = tmp_path / f"jobqd-{run}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"url": dsn},
                "log": {"format": "text", "level": "info"},
                "queues": {"default": {"processes": 1, "concurrency": 1}},
            }
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "jobqd", "-c", str(config)],
        env=daemon_env(dsn, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_daemon_on_sql_ascii_refuses_every_start_naming_the_encoding(database_in, tmp_path):
    dsn = database_in("SQL_ASCII")
    for run in range(2):
        done = _start_daemon(tmp_path, dsn, run)
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        assert "SQL_ASCII" in output and "TEMPLATE template0" in output, output
        assert "changed after it was applied" not in output, output
        assert "Traceback" not in output, output


def test_latin1_database_migrates_once_and_keeps_non_ascii_payloads(database_in):
    dsn = database_in("LATIN1")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert runner.migrate(conn, "jobqd")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert runner.migrate(conn, "jobqd") == []
    client = Client(dsn)
    job_id = client.enqueue("test.record", {"name": "Renée"})
    info = client.get(job_id)
    assert info is not None and info.args == {"name": "Renée"}

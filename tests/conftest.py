"""Test harness: a real Postgres and a fresh database for every test.

The server is JOBQD_TEST_DSN when set, else 127.0.0.1:5432 when it answers, else a private
embedded Postgres (pgserver) in a temp dir. The session migrates one uniquely named template
database; each test gets its own copy of it (`dsn`) or an empty one (`empty_dsn`), dropped
afterwards, so no test sees another's rows or depends on leftovers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import answers, wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd.store import embedded
from jobqd.store.migrate import migrate

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A DSN for an administrative database on the test server."""
    explicit = os.environ.get("JOBQD_TEST_DSN")
    if explicit:
        yield explicit
        return
    if answers(LOCAL_DSN):
        yield LOCAL_DSN
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="jobqd-test-pg-") as tmp:
        server = pgserver.get_server(tmp, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def embedded_template() -> Iterator[Path]:
    """An embedded data directory made once per session by jobqd's own first start (initdb,
    most of a first start's seconds) and stopped again, for `embedded_dir` to copy."""
    pytest.importorskip("pgserver")
    with tempfile.TemporaryDirectory(prefix="jobqd-test-embedded-") as tmp:
        data_dir = Path(tmp) / "pgdata"
        starter = "import sys; from jobqd.store.embedded import start; start(sys.argv[1])"
        subprocess.run([sys.executable, "-c", starter, str(data_dir)], check=True, timeout=120)
        wait_for(lambda: embedded.find(data_dir) is None, timeout=30, what="template stopped")
        yield data_dir


@pytest.fixture
def embedded_dir(embedded_template: Path) -> Iterator[Path]:
    """A directory for an embedded PostgreSQL of the test's own: DIR/pgdata, a fresh copy of
    an initialized one (nothing in it but what initdb made), outside pytest's tmp_path: as
    root, pgserver runs the server as the user `pgserver`, which must traverse every parent,
    and each pytest session makes /tmp/pytest-of-root private again. A server the test left
    running there is stopped."""
    with tempfile.TemporaryDirectory(prefix="jobqd-test-embedded-") as tmp:
        data_dir = Path(tmp) / "pgdata"
        # cp -a keeps the owner: as root, the files belong to the user `pgserver`
        subprocess.run(["cp", "-a", str(embedded_template), str(data_dir)], check=True)
        yield Path(tmp)
        if embedded.find(data_dir) is not None:
            embedded.release(data_dir, os.getpid())


def with_dbname(dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo("", **params)


class Databases:
    """Creates and drops uniquely named databases on the test server."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        self.run_id = uuid.uuid4().hex[:8]

    def create(self, *, template: str | None = None) -> str:
        name = f"jobqd_test_{self.run_id}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            if template:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop(self, name: str) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url(self, name: str) -> str:
        return with_dbname(self.server_dsn, name)


@pytest.fixture(scope="session")
def databases(server_dsn: str) -> Databases:
    return Databases(server_dsn)


@pytest.fixture(scope="session")
def template_db(databases: Databases) -> Iterator[str]:
    """A migrated database that per-test databases are copied from."""
    name = databases.create()
    with psycopg.connect(databases.url(name), autocommit=True) as conn:
        migrate(conn, "jobqd")
    yield name
    databases.drop(name)


@pytest.fixture
def dsn(databases: Databases, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = databases.create(template=template_db)
    yield databases.url(name)
    databases.drop(name)


@pytest.fixture
def empty_dsn(databases: Databases) -> Iterator[str]:
    """A fresh database with nothing in it."""
    name = databases.create()
    yield databases.url(name)
    databases.drop(name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection

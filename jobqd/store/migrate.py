"""Migration runner: numbered plain SQL files applied in order, once, under an advisory lock.

Ten daemons starting at once must migrate once: every runner takes the same session advisory
lock (derived from the schema name) before looking at what is applied, so the others wait and
then find nothing pending. Each file runs in its own transaction together with the row that
records it, so a failed file leaves no trace and is retried next time.

A database whose encoding is SQL_ASCII is refused before anything is read or written: it
stores bytes without knowing their encoding, so Postgres cannot convert JSON text for it (a
`\\u00e9` escape in a payload is an error), non-ASCII text reads back as undecodable bytes,
and every text column (the checksums below among them) reaches psycopg as bytes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

from jobqd.errors import MigrationError
from jobqd.store.locks import lock_key
from jobqd.store.sql import Queries, queries

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def migrations_dir() -> Path:
    """Where the SQL files are: inside the installed wheel, or at the top of a source checkout."""
    packaged = resources.files("jobqd") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "migrations"


def available(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migration files share a number")
    return found


def _applied(conn: psycopg.Connection, schema: str) -> dict[int, str]:
    statements = queries(schema)
    exists = conn.execute(statements.migrations_table_exists, {"schema": schema}).fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(statements.migrations_applied).fetchall()
    return {version: checksum for version, checksum in rows}


def _check(applied: dict[int, str], known: list[Migration]) -> list[Migration]:
    """Return what is pending, after refusing edited or unknown applied migrations."""
    by_version = {m.version: m for m in known}
    problems = []
    for version, checksum in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            problems.append(
                f"migration {version:04d} is applied in the database but unknown to this "
                "jobqd: the database is newer than the code; upgrade jobqd"
            )
        elif migration.checksum != checksum:
            problems.append(
                f"migration {version:04d}_{migration.name}.sql was changed after it was "
                "applied (checksum differs): restore the file; fix forward with a new migration"
            )
    if problems:
        raise MigrationError("\n".join(problems))
    return [m for m in known if m.version not in applied]


def check_encoding(conn: psycopg.Connection) -> None:
    """Refuse a SQL_ASCII database with the fix; the server reports its encoding when the
    session starts, so this costs no round trip."""
    encoding = conn.info.parameter_status("server_encoding")
    if encoding == "SQL_ASCII":
        raise MigrationError(
            f'database "{conn.info.dbname}" has encoding SQL_ASCII, which stores bytes '
            "unchecked: jobqd cannot keep JSON payloads in it (non-ASCII text is refused or "
            "comes back as raw bytes). Use a UTF8 database: CREATE DATABASE name ENCODING "
            "'UTF8' TEMPLATE template0, and point database.url at it"
        )


def pending(conn: psycopg.Connection, schema: str) -> list[Migration]:
    """Migrations not yet applied; raises MigrationError when the applied set is inconsistent
    or the database's encoding cannot hold jobqd's data."""
    check_encoding(conn)
    return _check(_applied(conn, schema), available())


def migrate(conn: psycopg.Connection, schema: str, *, dry_run: bool = False) -> list[Migration]:
    """Apply every pending migration; return the ones applied (or, dry run, that would be).

    `conn` must be in autocommit mode: the lock is session-level so that each file can have
    its own transaction while the lock is held across all of them.
    """
    if not conn.autocommit:
        raise ValueError("migrate() needs an autocommit connection")
    statements = queries(schema)
    lock = {"key": lock_key(schema, "migrate")}
    conn.execute(statements.migrations_lock, lock)
    try:
        todo = pending(conn, schema)
        if dry_run or not todo:
            return todo
        with conn.transaction():
            conn.execute(statements.migrations_create_schema)
            conn.execute(statements.migrations_create_table)
        for migration in todo:
            _apply(conn, statements, migration)
        return todo
    finally:
        conn.execute(statements.migrations_unlock, lock)


def _apply(conn: psycopg.Connection, statements: Queries, migration: Migration) -> None:
    try:
        with conn.transaction():
            conn.execute(statements.migrations_search_path)
            # The file itself: a script of many statements, not one that can be named.
            conn.execute(migration.text.encode())
            conn.execute(
                statements.migrations_record,
                {
                    "version": migration.version,
                    "name": migration.name,
                    "checksum": migration.checksum,
                },
            )
    except psycopg.Error as exc:
        raise MigrationError(
            f"migration {migration.version:04d}_{migration.name}.sql failed: {exc}"
        ) from exc

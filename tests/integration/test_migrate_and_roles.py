"""The migration runner and the documented database roles."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
import zipfile
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd.errors import MigrationError
from jobqd.store import migrate as runner

ROOT = Path(__file__).resolve().parents[2]


def test_migrate_creates_schema_then_is_a_no_op(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        applied = runner.migrate(conn, "jobqd")
        assert [m.version for m in applied] == [m.version for m in runner.available()]
        assert runner.migrate(conn, "jobqd") == []
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'jobqd'"
            ).fetchall()
        }
        assert {"jobs", "queues", "processes", "cron", "bundles", "migrations"} <= tables


def test_ten_concurrent_runners_migrate_once(empty_dsn):
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(10)

    def run() -> None:
        try:
            with psycopg.connect(empty_dsn, autocommit=True) as conn:
                barrier.wait()
                results.append(len(runner.migrate(conn, "jobqd")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [0] * 9 + [len(runner.available())]


def test_schema_name_is_configurable_and_isolated(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        runner.migrate(conn, "jobqd")
        runner.migrate(conn, "other_q")
        conn.execute("SELECT other_q.enqueue('q', 't')")
        assert conn.execute("SELECT count(*) FROM other_q.jobs").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 0


def test_changed_applied_migration_is_an_error(dsn, monkeypatch):
    real = runner.available()
    edited = [runner.Migration(m.version, m.name, m.text + "\n-- edited") for m in real]
    monkeypatch.setattr(runner, "available", lambda directory=None: edited)
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pytest.raises(MigrationError, match="changed after it was applied"),
    ):
        runner.migrate(conn, "jobqd")


def test_database_newer_than_code_is_an_error(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO jobqd.migrations VALUES (9999, 'future', 'x', now())")
        with pytest.raises(MigrationError, match="newer than the code"):
            runner.pending(conn, "jobqd")


def test_failing_migration_leaves_nothing_behind(empty_dsn, tmp_path, monkeypatch):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE b (x int); SELECT 1/0;")
    monkeypatch.setattr(runner, "migrations_dir", lambda: tmp_path)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        with pytest.raises(MigrationError, match=r"0002_bad\.sql failed"):
            runner.migrate(conn, "jobqd")
        versions = conn.execute("SELECT version FROM jobqd.migrations").fetchall()
        assert versions == [(1,)]
        assert conn.execute("SELECT to_regclass('jobqd.b')").fetchone()[0] is None


def test_wheel_ships_migrations(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("jobqd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[-1] for n in names if n.startswith("jobqd/migrations/")}
    assert shipped == {p.name for p in (ROOT / "migrations").glob("*.sql")}
    assert {f"jobqd/store/sql/{p.name}" for p in (ROOT / "jobqd/store/sql").glob("*.sql")} <= set(
        names
    )


def _as_role(dsn: str, role: str) -> str:
    params = conninfo_to_dict(dsn)
    params["user"] = role
    return make_conninfo("", **params)


@pytest.fixture
def roles(conn):
    suffix = uuid.uuid4().hex[:8]
    app, daemon = f"jobqd_app_{suffix}", f"jobqd_daemon_{suffix}"
    conn.execute(f"CREATE ROLE {app} LOGIN")
    conn.execute(f"CREATE ROLE {daemon} LOGIN")
    conn.execute("SELECT jobqd.grant_enqueue(%s)", (app,))
    conn.execute("SELECT jobqd.grant_daemon(%s)", (daemon,))
    yield app, daemon
    for role in (app, daemon):
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_enqueue_only_role_can_enqueue_and_nothing_else(dsn, conn, roles):
    app, _ = roles
    secret = conn.execute("SELECT jobqd.enqueue('q', 't', '{\"card\": \"4111\"}')").fetchone()[0]
    with psycopg.connect(_as_role(dsn, app), autocommit=True) as c:
        new = c.execute("SELECT jobqd.enqueue('q', 't', '{\"a\": 1}')").fetchone()[0]
        many = c.execute(
            "SELECT count(*) FROM jobqd.enqueue_many(ARRAY['q','q'], ARRAY['t','t'],"
            " ARRAY['{}','{}']::jsonb[])"
        ).fetchone()[0]
        assert new > secret and many == 2
        forbidden = [
            "SELECT args FROM jobqd.jobs",
            f"UPDATE jobqd.jobs SET state = 'cancelled' WHERE id = {secret}",
            f"SELECT jobqd.cancel({secret})",
            f"SELECT jobqd.retry({secret})",
            "SELECT jobqd.pause('q')",
            "DELETE FROM jobqd.jobs",
            "INSERT INTO jobqd.jobs (queue, task) VALUES ('q', 't')",
        ]
        for statement in forbidden:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 4
    assert conn.execute("SELECT state FROM jobqd.jobs WHERE id = %s", (secret,)).fetchone()[0] == (
        "queued"
    )


def test_daemon_role_can_operate(dsn, conn, roles):
    _, daemon = roles
    with psycopg.connect(_as_role(dsn, daemon), autocommit=True) as c:
        job = c.execute("SELECT jobqd.enqueue('q', 't')").fetchone()[0]
        assert c.execute("SELECT jobqd.cancel(%s)", (job,)).fetchone()[0] is True
        c.execute("SELECT jobqd.pause('q')")
        c.execute("DELETE FROM jobqd.jobs WHERE id = %s", (job,))

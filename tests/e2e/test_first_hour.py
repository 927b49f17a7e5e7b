"""A new user's first hour: `jobqd --init DIR`, the starter run from another directory on the
embedded PostgreSQL, jobqctl finding that server (dsn, psql, wait), and the server gone
with the master however the master went (here: SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_daemon import alive
from helpers import wait_for

from jobqd.errors import EXIT_FAILURE, EXIT_UNREACHABLE, EXIT_USAGE
from jobqd.store import embedded


def _env(embedded_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQD_", "NOTIFY_"))}
    env["STATE_DIRECTORY"] = str(embedded_dir)  # the default data dir: embedded_dir/pgdata
    return env


def _run(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_init_writes_a_starter_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "new" / "project"
    done = _run("jobqd", "--init", str(target), env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config, module = target / "jobqd.yaml", target / "tasks.py"
    assert f"jobqd -c {config}" in done.stdout
    text = config.read_text()
    assert "imports: [tasks]" in text and "task: tasks.tick" in text
    assert "jobqd.examples" not in text + module.read_text()
    assert "--init" not in module.read_text()  # the note for jobqd/examples.py's readers

    module.write_text("# mine\n")
    again = _run("jobqd", "--init", str(target), env=_env(tmp_path), cwd=tmp_path)
    assert again.returncode == EXIT_FAILURE
    assert again.stderr.strip() == (
        f"jobqd: not writing the starter: {config}, {module} already exist; choose another "
        "directory or move them away"
    )
    assert module.read_text() == "# mine\n" and config.read_text() == text


def test_the_starter_runs_on_the_embedded_database_and_dies_with_its_master(tmp_path, embedded_dir):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(embedded_dir)
    assert _run("jobqd", "--init", str(project), env=env, cwd=tmp_path).returncode == 0
    config = str(project / "jobqd.yaml")
    # not running yet: jobqctl says so and what to run, and does not start it
    idle = _run("jobqd.cli.ctl", "-c", config, "status", env=env, cwd=elsewhere)
    assert idle.returncode == EXIT_UNREACHABLE
    assert "is not running" in idle.stderr and "jobqd -c FILE" in idle.stderr
    assert embedded.find(embedded_dir / "pgdata") is None

    log = (tmp_path / "daemon.log").open("wb")
    master = subprocess.Popen(  # from another directory: tasks.py is found beside the config
        [sys.executable, "-m", "jobqd", "-c", config],
        env=env,
        cwd=elsewhere,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = wait_for(
            lambda: embedded.find(embedded_dir / "pgdata"), timeout=90, what="embedded server"
        )
        postmaster = int((embedded_dir / "pgdata" / "postmaster.pid").read_text().split()[0])

        def enqueued() -> int | None:
            done = _run(
                "jobqd.cli.ctl",
                "enqueue",
                "send_welcome",
                "--args",
                '{"user_id": 7}',
                "-q",
                env=env,
                cwd=elsewhere,
            )  # no -c: the embedded server in the default data directory
            tried.append(done.stderr.strip())
            return int(done.stdout) if done.returncode == 0 else None

        tried: list[str] = []
        try:
            job = wait_for(enqueued, timeout=60, what="the schema, so that jobqctl can enqueue")
        except AssertionError:
            log.flush()
            daemon = (tmp_path / "daemon.log").read_text(errors="replace")[-3000:]
            raise AssertionError(
                f"jobqctl enqueue said {tried[-1:]}; the daemon: {daemon}"
            ) from None
        done = _run(
            "jobqd.cli.ctl", "-c", config, "wait", str(job), "--json", env=env, cwd=elsewhere
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"states": {str(job): "succeeded"}}

        dsn = _run("jobqd.cli.ctl", "-c", config, "dsn", "--json", env=env, cwd=elsewhere)
        document = json.loads(dsn.stdout)
        assert document["url"] == url and document["url"].startswith("postgresql://postgres@")
        assert document["password"] is None
        if shutil.which("psql"):  # else jobqctl psql runs pgserver's own
            sql = f"SELECT queue || ' ' || state FROM jobqd.jobs WHERE id = {job}"
            psql = subprocess.run(
                ["psql", document["url"], "-XtAc", sql], capture_output=True, text=True, timeout=30
            )
            assert psql.stdout.strip() == "emails succeeded", psql.stderr
        via = _run("jobqd.cli.ctl", "psql", "--", "-XtAc", "SELECT 6 * 7", env=env, cwd=elsewhere)
        assert via.stdout.strip() == "42", via.stderr

        master.send_signal(signal.SIGKILL)
        master.wait(10)
        wait_for(lambda: not alive(postmaster), timeout=60, what="the server to stop")
        said = f"stopped the embedded PostgreSQL in {embedded_dir / 'pgdata'}: pid {master.pid}"
        wait_for(
            lambda: said in (tmp_path / "daemon.log").read_text(), timeout=10, what="its log line"
        )
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()
        log.close()
    gone = _run("jobqd.cli.ctl", "status", env=env, cwd=elsewhere)
    assert gone.returncode == EXIT_USAGE
    assert f"no embedded PostgreSQL runs in {embedded_dir / 'pgdata'}" in gone.stderr


def test_the_wheel_ships_the_starter(tmp_path):
    """A pip user has the example config: --init works from the installed wheel alone."""
    root = Path(__file__).resolve().parents[2]
    builders = pytest.importorskip("hatchling.builders.wheel", reason="pip install -e '.[test]'")
    (wheel,) = builders.WheelBuilder(str(root)).build(
        directory=str(tmp_path), versions=["standard"]
    )
    shutil.unpack_archive(wheel, tmp_path / "site", format="zip")
    assert (tmp_path / "site" / "jobqd" / "etc" / "jobqd.example.yaml").is_file()
    env = {**_env(tmp_path), "PYTHONPATH": str(tmp_path / "site")}
    done = _run("jobqd", "--init", str(tmp_path / "p"), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "p" / "jobqd.yaml").read_text()
    assert f"described in {tmp_path / 'site' / 'jobqd' / 'etc' / 'jobqd.yaml'}" in text
    check = _run(
        "jobqd", "-c", str(tmp_path / "p" / "jobqd.yaml"), "--check", env=env, cwd=tmp_path
    )
    assert check.returncode == 0, check.stderr

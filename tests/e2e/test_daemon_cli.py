"""`jobqd --check` and a refused start: every problem at once, as FILE:LINE: key: message."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from e2e_daemon import daemon_env

from jobqd.errors import EXIT_CONFIG


def _jobqd(tmp_path, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "jobqd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or daemon_env("postgresql:///unused"),
        cwd=tmp_path,
    )


BROKEN = """\
database: postgresql:///unused
queues:
  default:
    lease: thirty
    concurency: 4
"""


def test_check_prints_every_error_with_file_and_line_and_exits_1(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = _jobqd(tmp_path, "--check", "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:4: queues.default.lease: expected a duration")
    assert lines[1] == (
        f'{path}:5: queues.default.concurency: unknown key (did you mean "concurrency"?)'
    )
    assert lines[-1] == f"jobqd: configuration file {path} test failed"
    assert result.stdout == ""


def test_check_imports_modules_and_resolves_cron_tasks(tmp_path):
    path = tmp_path / "jobqd.yaml"
    path.write_text(
        textwrap.dedent("""\
        database: postgresql:///unused
        imports:
          - helpers
          - no_such_module_anywhere
        tasks:
          backup:
            command: [/bin/true]
        cron:
          nightly:
            schedule: "0 3 * * *"
            task: test.recrod
          backup:
            schedule: "@daily"
            task: backup
        """)
    )
    result = _jobqd(tmp_path, "--check", "-c", str(path))
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert errors[0].startswith(f"{path}:4: imports[1]: cannot import 'no_such_module_anywhere'")
    assert errors[1] == (
        f'{path}:11: cron.nightly.task: no task named "test.recrod": neither registered by a '
        'module in imports nor defined under tasks: (did you mean "test.record"?)'
    )


def test_check_accepts_the_example_config(tmp_path):
    example = str(Path(__file__).resolve().parents[2] / "etc" / "jobqd.example.yaml")
    result = _jobqd(tmp_path, "--check", "-c", example)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{example}: configuration ok"


def test_start_refuses_a_bad_config_with_exit_78_and_a_missing_file_says_where_it_looked(
    tmp_path,
):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = _jobqd(tmp_path, "-c", str(path))
    assert result.returncode == EXIT_CONFIG
    assert f"{path}:4: queues.default.lease" in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"jobqd: not starting: configuration file {path} is invalid"
    )

    env = daemon_env("postgresql:///unused", JOBQD_CONFIG=str(tmp_path / "missing.yaml"))
    result = _jobqd(tmp_path, env=env)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.splitlines() == [
        f"{tmp_path}/missing.yaml: cannot read: No such file or directory",
        f"jobqd: not starting: configuration file {tmp_path}/missing.yaml is invalid "
        "(named by $JOBQD_CONFIG; pass -c FILE for another)",
    ]

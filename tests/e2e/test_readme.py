"""The README's quickstart, walked as a new user would: the daemon on a fresh embedded
PostgreSQL with the example config, then every example of "Try it" and "Enqueue" as written,
in order, in one shell session (what a block exports, the next one sees), and proof that
the jobs they made ran.

Each fenced block in those sections carries a marker comment on the line before it:
`<!-- readme-test: KIND -->`, where KIND is `daemon` (the command after the block's last
`&&` starts the daemon), `run` (shell), `sql` (through `jobqctl psql`), `python`, or
`skip (why)`. A block without a marker fails the test, so a new example cannot slip by.

What stands in for the user's machine: a project directory with the repository's `etc/` and a
`.venv/bin` whose `activate`, `jobqd`, `jobqctl` and `python` are this test's Python (the
README's `python3 -m venv && pip install` is the one step not run), and STATE_DIRECTORY
pointing the embedded server's default data directory into the test's own directory.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
from e2e_daemon import alive
from helpers import wait_for

from jobqd.store import embedded

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTIONS = ("Try it", "Enqueue")
_MARKER = re.compile(r"<!-- readme-test: (daemon|run|sql|python|skip)\b[^>]*-->")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


@dataclass(frozen=True)
class Block:
    kind: str
    text: str
    line: int


def quickstart_blocks() -> list[Block]:
    """The fenced blocks of SECTIONS, each with the kind its marker gives (None: unmarked)."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for section in re.split(r"(?m)^(?=## )", text):
        if section.splitlines()[0].removeprefix("## ").strip() not in SECTIONS:
            continue
        offset = text.index(section)
        for fence in _FENCE.finditer(section):
            before = section[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = _MARKER.fullmatch(before.strip())
            line = text.count("\n", 0, offset + fence.start()) + 1
            blocks.append(Block(marker.group(1) if marker else "", fence.group(2), line))
    return blocks


def _project(tmp_path: Path) -> Path:
    """A directory like the user's clone after the README's first command."""
    project = tmp_path / "project"
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (project / "etc").symlink_to(ROOT / "etc")
    shims = {
        "jobqd": f'exec {shlex.quote(sys.executable)} -m jobqd "$@"',
        "jobqctl": f'exec {shlex.quote(sys.executable)} -m jobqd.cli.ctl "$@"',
        "python": f'exec {shlex.quote(sys.executable)} "$@"',
    }
    for name, line in shims.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "activate").write_text(
        f"VIRTUAL_ENV={shlex.quote(str(project / '.venv'))}\nexport VIRTUAL_ENV\n"
        'PATH="$VIRTUAL_ENV/bin:$PATH"\nexport PATH\n'
    )
    return project


class Session:
    """One terminal: blocks run in `project`, each starting from the environment the previous
    one left (what it exported, the PATH that `activate` set)."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.project = project
        self.env = env
        self._env_file = project.parent / "session.env"

    def run(self, block: Block) -> str:
        if block.kind == "run":
            script = block.text
        elif block.kind == "sql":
            script = "jobqctl psql -- -X -q -v ON_ERROR_STOP=1 <<'README_SQL'\n"
            script += block.text + "README_SQL\n"
        else:
            script = f"python - <<'README_PYTHON'\n{block.text}README_PYTHON\n"
        script = f"set -e\n{script}\nenv -0 > {shlex.quote(str(self._env_file))}\n"
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, (
            f"README.md:{block.line}: the {block.kind} block failed ({done.returncode}):\n"
            f"{block.text}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
        entries = self._env_file.read_text().split("\0")
        self.env = dict(entry.split("=", 1) for entry in entries if "=" in entry)
        return done.stdout


def _scalar(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return row[0] if row else None


def test_every_quickstart_block_is_marked():
    blocks = quickstart_blocks()
    unmarked = [f"README.md:{b.line}" for b in blocks if not b.kind]
    assert not unmarked, f"fenced blocks with no readme-test marker: {', '.join(unmarked)}"
    kinds = [b.kind for b in blocks]
    assert kinds[0] == "daemon" and {"run", "sql", "python"} <= set(kinds)


def test_the_readme_quickstart_works_as_written(tmp_path, embedded_dir):
    blocks = quickstart_blocks()
    project = _project(tmp_path)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JOBQD_", "NOTIFY_", "WATCHDOG_")) and k != "DATABASE_URL"
    }
    env["STATE_DIRECTORY"] = str(embedded_dir)  # the default data dir: embedded_dir/pgdata
    data_dir = embedded_dir / "pgdata"

    daemon_line = blocks[0].text.strip().rsplit("&&", 1)[-1]
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            shlex.split(daemon_line), cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        url = wait_for(lambda: embedded.find(data_dir), timeout=90, what="the embedded PostgreSQL")
        # ready for the examples: migrated, and the emails worker has published its tasks
        wait_for(
            lambda: _published(url),
            timeout=60,
            what=f"the workers to publish their tasks; daemon log:\n{log_path.read_text()}",
        )
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        session = Session(project, env)
        for block in blocks[1:]:
            if block.kind != "skip":
                session.run(block)
        assert session.env["DATABASE_URL"] == url  # what `jobqctl dsn` printed

        def welcomes() -> int:
            return int(
                _scalar(
                    url,
                    "SELECT count(*) FROM jobqd.jobs WHERE task = 'send_welcome' "
                    "AND queue = 'emails' AND state = 'succeeded'",
                )
            )

        # jobqctl 1, SQL 1 (the NULL-queue one waits 60 s, the other an hour), Python 101
        wait_for(lambda: welcomes() >= 103, timeout=60, what="the welcome jobs to run")
        waiting = "SELECT count(*) FROM jobqd.jobs WHERE task = 'send_welcome' AND state = 'queued'"
        assert _scalar(url, waiting) == 3  # the delayed ones: 1 h, 60 s (SQL), 60 s (Python)
        queues = "SELECT array_agg(DISTINCT queue) FROM jobqd.jobs WHERE task = 'send_welcome'"
        assert _scalar(url, queues) == ["emails"]  # also those that named no queue

        def retried() -> object:
            return _scalar(
                url,
                "SELECT jsonb_array_length(errors) = 2 FROM jobqd.jobs "
                "WHERE task = 'jobqd.examples.fail' AND state = 'dead'",
            )

        wait_for(retried, timeout=30, what="the retried job to fail a second time")
        assert _scalar(url, "SELECT count(*) FROM users") == 1
        assert _scalar(
            url,
            "SELECT count(*) FROM jobqd.jobs WHERE task = 'jobqd.examples.tick' "
            "AND state = 'succeeded'",
        )
        assert (project / "myproject" / "tasks.py").exists()
    finally:
        daemon.send_signal(signal.SIGTERM)  # Ctrl-C's drain
        code = daemon.wait(60)
    assert code == 0, log_path.read_text()
    wait_for(lambda: not alive(postmaster), timeout=30, what="the embedded server to stop")


def _published(url: str) -> bool:
    try:
        return _scalar(url, "SELECT queue FROM jobqd.tasks WHERE name = 'send_welcome'") == (
            "emails"
        )
    except psycopg.Error:
        return False

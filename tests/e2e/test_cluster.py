"""Three `jobqd` daemons on one database, as three nodes of a cluster would run them: one
leader, a handover after `kill -9` of the leader, and cron ticks fired once each across it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psycopg
from e2e_daemon import Daemon, base_config, daemon_env, title
from helpers import wait_for


def leader(config_path) -> dict | None:
    """The leader as `jobqctl status --json` reports it (read from the lock, not a row)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQD_")}
    done = subprocess.run(
        [sys.executable, "-m", "jobqd.cli.ctl", "-c", str(config_path), "status", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["leader"]


def test_three_daemons_one_leader_handover_and_cron_once_per_tick(tmp_path, ledger):
    config = base_config(ledger)
    config["maintenance"] = {"interval": "200ms", "standby_retry": "500ms"}
    config["cron"] = {
        "every_second": {"schedule": "* * * * * *", "task": "test.noop", "misfire": "all"}
    }
    daemons = []
    try:
        for n in range(3):
            home = tmp_path / f"node{n}"
            home.mkdir()
            daemon = Daemon(home, ledger, daemon_env(ledger, home))
            daemon.write_config(config)
            daemons.append(daemon.start())
        maintenance = {d.booted("maintenance"): d for d in daemons}
        first = wait_for(lambda: leader(daemons[0].config_path), what="a leader")
        assert first["pid"] in maintenance, "the leader is one of the three maintenance children"
        wait_for(
            lambda: [pid for pid in maintenance if "leader" in title(pid)] == [first["pid"]],
            what="exactly one maintenance process titled leader",
        )

        wait_for(lambda: _ticks(ledger) >= 5, what="five ticks from the first leader")
        os.kill(first["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        second = wait_for(
            lambda: (found := leader(daemons[1].config_path)) and found["pid"] != first["pid"],
            timeout=10,
            what="a new leader within 10 s",
        )
        handover = time.monotonic() - killed_at
        assert second
        ticks_at_handover = _ticks(ledger)
        wait_for(lambda: _ticks(ledger) >= ticks_at_handover + 5, what="ticks from the new leader")
    finally:
        for daemon in daemons:
            daemon.stop()

    with psycopg.connect(ledger) as conn:
        rows = conn.execute(
            "SELECT (args->>'cron_tick')::timestamptz, count(*) FROM jobqd.jobs"
            " WHERE task = 'test.noop' GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert all(count == 1 for _, count in rows), "a tick was enqueued twice"
    seconds = [tick for tick, _ in rows]
    assert seconds == [seconds[0] + timedelta(seconds=n) for n in range(len(seconds))], (
        "misfire: all must leave no second out across the handover"
    )
    print(f"handover after kill -9 of the leader: {handover:.2f}s, {len(rows)} ticks")


def _ticks(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM jobqd.cron_ticks").fetchone()[0]

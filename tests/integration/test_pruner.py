"""Pruning against a real Postgres: what retention deletes and keeps, and the duty's
cadence (its first run after taking over, its pass interval).
"""

from __future__ import annotations

from datetime import timedelta

from jobqd.config.settings import parse
from jobqd.maintenance.pruner import PRUNE_INTERVAL, Pruner, prune, sync_settings

RETENTION = """
retention: {succeeded: 1h, dead: 1d, idempotency: 2h}
queues:
  default: {}
  keep: {retention: {succeeded: 7d, dead: 30d}}
"""


def test_prune_deletes_only_what_retention_says(conn):
    rows = [  # queue, state, finished this long ago, pruned?
        ("default", "succeeded", "2 hours", True),
        ("default", "succeeded", "30 minutes", False),
        ("default", "cancelled", "2 hours", True),
        ("default", "dead", "2 hours", False),
        ("default", "dead", "2 days", True),
        ("keep", "succeeded", "2 days", False),
        ("keep", "succeeded", "8 days", True),
        ("keep", "dead", "2 days", False),
        ("keep", "dead", "31 days", True),
        ("elsewhere", "succeeded", "2 hours", True),  # not configured: top-level retention
        ("elsewhere", "succeeded", "10 minutes", False),
    ]
    for queue, state, age, _ in rows * 3:  # three of each, so batches of 2 must loop
        conn.execute(
            "INSERT INTO jobqd.jobs (queue, task, state, finished_at, created_at)"
            " VALUES (%s, %s, %s, now() - %s::interval, now() - %s::interval)",
            (queue, f"{queue}/{state}/{age}", state, age, age),
        )
    conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, created_at) VALUES ('default', 'waiting',"
        " now() - interval '90 days')"
    )
    conn.execute(
        "INSERT INTO jobqd.idempotency_keys VALUES ('gone', 1, now() - interval '1 second'),"
        " ('kept', 2, now() + interval '1 hour')"
    )
    conn.execute(
        "INSERT INTO jobqd.cron (name, last_tick) VALUES ('nightly', now() - interval '3 days')"
    )
    conn.execute(
        "INSERT INTO jobqd.cron_ticks (name, tick, job_id) VALUES"
        " ('nightly', now() - interval '4 days', 1),"
        " ('nightly', (SELECT last_tick FROM jobqd.cron WHERE name = 'nightly'), 2),"
        " ('nightly', now() - interval '10 minutes', 3)"
    )
    conn.execute(
        "INSERT INTO jobqd.bundles (total, finished_at) VALUES"
        " (1, now() - interval '2 days'), (1, now() - interval '2 hours'), (1, NULL)"
    )
    config = parse(RETENTION, "<test>", {"JOBQD_DATABASE_URL": "postgresql:///unused"})

    counts = prune(conn, config, batch=2)

    survivors = {task for (task,) in conn.execute("SELECT task FROM jobqd.jobs").fetchall()}
    expected = {f"{q}/{s}/{a}" for q, s, a, pruned in rows if not pruned} | {"waiting"}
    assert survivors == expected
    assert conn.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0] == 3 * 5 + 1
    assert counts == {
        "succeeded": 9,
        "cancelled": 3,
        "dead": 6,
        "idempotency_keys": 1,
        "cron_ticks": 1,  # the 3-day-old one is the entry's last tick: kept
        "bundles": 1,
    }
    assert prune(conn, config) == dict.fromkeys(counts, 0)
    assert sync_settings(conn, config)
    window = conn.execute("SELECT idempotency_window FROM jobqd.settings").fetchone()[0]
    assert window == timedelta(hours=2)
    assert not sync_settings(conn, config)


def test_the_pruner_duty_waits_after_taking_over_then_runs_every_interval(conn):
    config = parse(RETENTION, "<test>", {"JOBQD_DATABASE_URL": "postgresql:///unused"})
    conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, state, finished_at)"
        " VALUES ('default', 'old', 'succeeded', now() - interval '2 hours')"
    )
    duty = Pruner(config)
    duty.start(100.0)
    assert not duty.due(104.9) and duty.due(105.0)

    result = duty.run_due(conn, 105.0)

    assert result.counts["succeeded"] == 1
    assert result.again_in == PRUNE_INTERVAL and duty.next_due == 105.0 + PRUNE_INTERVAL

"""Priority aging against a real Postgres: how far waiting jobs move, and the duty's cadence."""

from __future__ import annotations

import math

from jobqd.config.settings import parse
from jobqd.maintenance import aging


def test_aging_moves_waiting_jobs_forward_step_by_step_down_to_the_floor(conn):
    config = parse(
        """
queues:
  default: {}
  bulk: {aging: {after: 10s, every: 10s, step: 2, floor: -5}}
""",
        "<test>",
        {"JOBQD_DATABASE_URL": "postgresql:///unused"},
    )
    cases = [  # queue, state, waited seconds, priority, expected priority
        ("bulk", "queued", 5, 0, 0),  # not waited long enough
        ("bulk", "queued", 15, 0, -2),  # one step at `after`
        ("bulk", "queued", 25, 0, -4),  # and one more per `every`
        ("bulk", "queued", 100, 0, -5),  # not past the floor
        ("bulk", "queued", 25, 10, 6),
        ("bulk", "queued", 100, -10, -10),  # already ahead of the floor: untouched
        ("bulk", "running", 100, 0, 0),
        ("default", "queued", 100, 0, 0),  # no aging configured
    ]
    ids = []
    for queue, state, waited, priority, _ in cases:
        ids.append(
            conn.execute(
                "INSERT INTO jobqd.jobs (queue, task, state, priority, run_at, lease_expires_at,"
                " lease_token) VALUES (%s, 'x', %s, %s, now() - %s * interval '1 second',"
                " CASE WHEN %s = 'running' THEN now() END, CASE WHEN %s = 'running' THEN 1 END)"
                " RETURNING id",
                (queue, state, priority, waited, state, state),
            ).fetchone()[0]
        )

    assert aging.run_once(conn, config, batch=2) == {"bulk": 4}
    assert aging.run_once(conn, config) == {}  # computed from the original: nothing more yet

    got = dict(conn.execute("SELECT id, priority FROM jobqd.jobs").fetchall())
    assert [got[i] for i in ids] == [case[4] for case in cases]
    base = conn.execute("SELECT base_priority FROM jobqd.jobs WHERE id = %s", (ids[4],)).fetchone()[
        0
    ]
    assert base == 10
    # Claim order: the aged job now runs before a fresh job of priority -3.
    fresh = conn.execute(
        "INSERT INTO jobqd.jobs (queue, task, priority) VALUES ('bulk', 'fresh', -3) RETURNING id"
    ).fetchone()[0]
    order = conn.execute(
        "SELECT array_agg(id ORDER BY priority, run_at, id) FROM jobqd.jobs WHERE id = ANY(%s)",
        ([fresh, ids[3]],),
    ).fetchone()[0]
    assert order == [ids[3], fresh]


def test_the_aging_duty_runs_at_its_finest_every_and_never_without_aging(conn):
    config = parse(
        "queues: {default: {}, bulk: {aging: {after: 10s, every: 10s, step: 2, floor: -5}}}",
        "<test>",
        {"JOBQD_DATABASE_URL": "postgresql:///unused"},
    )
    duty = aging.Aging(config)
    duty.start(100.0)
    assert duty.due(100.0)
    assert duty.run_due(conn, 100.0).again_in == 10.0 and duty.next_due == 110.0

    idle = aging.Aging(parse("queues: {default: {}}", "<test>", {"JOBQD_DATABASE_URL": "x"}))
    idle.start(100.0)
    assert not idle.enabled and idle.next_due == math.inf

"""Cron against a real Postgres: once-only ticks, misfire policies, manual runs, status, the
duty's cadence, and a one-second schedule across a leader kill in maintenance processes.
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta

import psycopg
import pytest
from helpers import scalar, wait_for
from leaders import FAST, leader_pid, start

from jobqd.config.settings import parse
from jobqd.maintenance.cron import (
    Cron,
    UnknownEntry,
    cron_status,
    fire_now,
    run_once,
    tick_text,
)

MINUTELY = """
cron:
  skip: {schedule: "* * * * *", task: t.skip, misfire: skip}
  once: {schedule: "* * * * *", task: t.once, misfire: once}
  all: {schedule: "* * * * *", task: t.all, misfire: all, misfire_window: 10m}
"""


def settings(text: str):
    return parse(text, "<test>", {"JOBQD_DATABASE_URL": "postgresql:///unused"})


def jobs(conn, task):
    return conn.execute(
        "SELECT args->>'cron_tick', queue, priority FROM jobqd.jobs WHERE task = %s ORDER BY id",
        (task,),
    ).fetchall()


@pytest.fixture
def t0(conn):
    """A whole minute an hour ago, in database time."""
    return conn.execute("SELECT date_trunc('minute', now()) - interval '1 hour'").fetchone()[0]


def set_last_tick(conn, names, tick):
    for name in names:
        conn.execute(
            "INSERT INTO jobqd.cron (name, last_tick) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET last_tick = excluded.last_tick",
            (name, tick),
        )


def test_new_entry_fires_nothing_from_before_it_was_seen(conn):
    config = settings(MINUTELY)
    first = run_once(conn, config)
    assert first.fired == {}
    assert conn.execute("SELECT count(*) FROM jobqd.cron").fetchone()[0] == 3
    assert first.next_tick is not None and first.next_tick > first.now


def test_misfire_policies_after_downtime(conn, t0):
    config = settings(MINUTELY)
    set_last_tick(conn, ["skip", "once", "all"], t0)
    now = t0 + timedelta(minutes=30, seconds=30)
    result = run_once(conn, config, now=now)
    assert jobs(conn, "t.skip") == []
    assert jobs(conn, "t.once") == [(tick_text(t0 + timedelta(minutes=30)), "default", 0)]
    assert [row[0] for row in jobs(conn, "t.all")] == [
        tick_text(t0 + timedelta(minutes=m)) for m in range(21, 31)
    ]
    assert set(result.fired) == {"once", "all"}
    last = dict(conn.execute("SELECT name, last_tick FROM jobqd.cron").fetchall())
    assert last == {"skip": t0, "once": t0 + timedelta(minutes=30), "all": last["once"]}
    # Nothing is due twice.
    assert run_once(conn, config, now=now).fired == {}


def test_a_tick_row_stops_a_second_leader_with_a_stale_cursor(conn, t0):
    config = settings(MINUTELY)
    set_last_tick(conn, ["all"], t0)
    now = t0 + timedelta(minutes=5, seconds=1)
    assert len(run_once(conn, config, now=now).fired["all"]) == 5
    set_last_tick(conn, ["all"], t0)  # a leader that never saw the commit
    assert run_once(conn, config, now=now).fired == {}
    assert len(jobs(conn, "t.all")) == 5


def test_concurrent_leaders_fire_each_tick_once(dsn, conn, t0):
    config = settings(MINUTELY)
    set_last_tick(conn, ["all"], t0)
    now = t0 + timedelta(minutes=3, seconds=1)
    with psycopg.connect(dsn, autocommit=True) as first, psycopg.connect(dsn) as blocker:
        # Hold the entry's row lock, so both leaders read the old cursor and then queue up.
        blocker.execute("SELECT 1 FROM jobqd.cron WHERE name = 'all' FOR UPDATE")
        results = []
        threads = [
            threading.Thread(target=lambda c=c: results.append(run_once(c, config, now=now)))
            for c in (first, conn)
        ]
        for thread in threads:
            thread.start()
        wait_for(
            lambda: (
                blocker.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).fetchone()[0]
                == 2
            ),
            what="both leaders waiting for the entry's row",
        )
        blocker.rollback()
        for thread in threads:
            thread.join(10)
    fired = sorted(len(r.fired.get("all", [])) for r in results)
    assert fired == [0, 3]
    assert len(jobs(conn, "t.all")) == 3


def test_entry_settings_reach_the_job_and_disabled_entries_do_not_fire(conn, t0):
    config = settings(
        """
queues: {default: {}, reports: {}}
cron:
  report:
    schedule: "* * * * *"
    timezone: Europe/Berlin
    task: t.report
    queue: reports
    priority: -5
    args: {kind: nightly}
  off: {schedule: "* * * * *", task: t.off, enabled: false, misfire: all}
"""
    )
    set_last_tick(conn, ["report", "off"], t0)
    run_once(conn, config, now=t0 + timedelta(minutes=10, seconds=2))
    assert jobs(conn, "t.report") == [(tick_text(t0 + timedelta(minutes=10)), "reports", -5)]
    assert conn.execute(
        "SELECT args->>'kind' FROM jobqd.jobs WHERE task = 't.report'"
    ).fetchone() == ("nightly",)
    assert jobs(conn, "t.off") == []


def test_a_failing_entry_is_reported_and_does_not_stop_the_others(conn, t0):
    config = settings(
        """
cron:
  big: {schedule: "* * * * *", task: t.big, args: {blob: "0123456789012345678901234567890"}}
  small: {schedule: "* * * * *", task: t.small}
"""
    )
    conn.execute("UPDATE jobqd.settings SET max_payload_bytes = 60")
    set_last_tick(conn, ["big", "small"], t0)
    result = run_once(conn, config, now=t0 + timedelta(minutes=1, seconds=1))
    assert "over the limit" in result.failed["big"]
    assert len(result.fired["small"]) == 1
    last = dict(conn.execute("SELECT name, last_tick FROM jobqd.cron").fetchall())
    assert last["big"] == t0  # not moved on: the tick is tried again next pass


def test_fire_now_enqueues_a_manual_tick_without_moving_the_schedule(conn, t0):
    config = settings(MINUTELY)
    set_last_tick(conn, ["once"], t0)
    job_id = fire_now(conn, config, "once")
    tick, manual = conn.execute(
        "SELECT tick, manual FROM jobqd.cron_ticks WHERE job_id = %s", (job_id,)
    ).fetchone()
    assert manual is True
    args = conn.execute("SELECT args FROM jobqd.jobs WHERE id = %s", (job_id,)).fetchone()[0]
    assert args == {"cron_tick": tick_text(tick)}
    assert conn.execute("SELECT last_tick FROM jobqd.cron WHERE name = 'once'").fetchone() == (t0,)
    assert fire_now(conn, config, "once") != job_id
    with pytest.raises(UnknownEntry, match="no cron entry named 'nope' \\(entries: all, once"):
        fire_now(conn, config, "nope")


def test_cron_status_shows_last_and_next_ticks(conn, t0):
    config = settings(MINUTELY + '  off: {schedule: "0 3 * * *", task: t.off, enabled: false}\n')
    set_last_tick(conn, ["all"], t0)
    run_once(conn, config, now=t0 + timedelta(minutes=1, seconds=1))
    status = {row["name"]: row for row in cron_status(conn, config)}
    assert list(status) == ["all", "off", "once", "skip"]
    fired = status["all"]
    assert fired["last_tick"] == t0 + timedelta(minutes=1)
    assert (
        fired["last_job_id"]
        == conn.execute("SELECT id FROM jobqd.jobs WHERE task = 't.all'").fetchone()[0]
    )
    now = conn.execute("SELECT now()").fetchone()[0]
    assert now < fired["next_tick"] <= now + timedelta(minutes=1)
    assert status["skip"]["last_tick"] is None
    assert status["off"]["enabled"] is False and status["off"]["next_tick"] is None
    assert fired["schedule"] == "* * * * *" and fired["timezone"] == "UTC"


CRON = (
    FAST
    + """
cron:
  all:
    schedule: "* * * * * *"
    task: test.noop
    misfire: all
  skip:
    schedule: "* * * * * *"
    task: test.noop
    args: {entry: skip}
"""
)


def ticks(dsn, name):
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT t.tick, j.args->>'cron_tick', j.task FROM jobqd.cron_ticks t"
            " JOIN jobqd.jobs j ON j.id = t.job_id WHERE t.name = %s ORDER BY t.tick",
            (name,),
        ).fetchall()


def test_cron_fires_once_per_tick_across_a_leader_kill(db, procs):
    for _ in range(2):
        start(procs, db, CRON)
    first = wait_for(lambda: leader_pid(db), what="a leader")
    wait_for(lambda: len(ticks(db, "all")) >= 4, what="four ticks")
    os.kill(first, signal.SIGKILL)
    killed = scalar(db, "SELECT now()")
    wait_for(lambda: leader_pid(db) not in (None, first), timeout=10, what="a new leader")
    wait_for(
        lambda: (
            scalar(db, "SELECT count(*) FROM jobqd.cron_ticks WHERE tick > %s", (killed,)) >= 10
        ),
        timeout=15,
        what="ticks from the new leader",
    )
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(10)

    # No tick enqueued twice: one job per (entry, tick), and no job outside cron_ticks.
    with psycopg.connect(db) as c:
        dupes = c.execute(
            "SELECT args->>'entry', args->>'cron_tick' FROM jobqd.jobs"
            " GROUP BY 1, 2 HAVING count(*) > 1"
        ).fetchall()
        jobs = c.execute("SELECT count(*) FROM jobqd.jobs").fetchone()[0]
    assert dupes == []
    fired_all, fired_skip = ticks(db, "all"), ticks(db, "skip")
    assert jobs == len(fired_all) + len(fired_skip)
    assert all(text == tick_text(tick) for tick, text, _ in fired_all + fired_skip)
    # misfire: all -> every second from the first tick to the last, the handover included.
    seconds = [tick for tick, _, _ in fired_all]
    assert seconds == [seconds[0] + timedelta(seconds=n) for n in range(len(seconds))]
    # misfire: skip -> the handover was shorter than the on-time tolerance: nothing skipped.
    skipped = [tick for tick, _, _ in fired_skip]
    assert skipped == [skipped[0] + timedelta(seconds=n) for n in range(len(skipped))]


def test_the_cron_duty_is_due_again_at_the_next_tick_or_one_interval_on(conn):
    every_second = settings(
        'maintenance: {interval: 2s}\ncron: {s: {schedule: "* * * * * *", task: t.s}}'
    )
    duty = Cron(every_second)
    duty.start(100.0)
    assert duty.due(100.0)
    result = duty.run_due(conn, 100.0)
    assert dict(result.counts) == {"fired": 0, "failed": 0}  # first seen: due from now on
    assert 0.0 <= result.again_in <= 1.005 and duty.next_due == 100.0 + result.again_in
    assert Cron(settings("maintenance: {interval: 2s}")).run(conn).again_in == 2.0


class _FailingEnqueue:
    """The leader session, except that enqueueing a tick fails with an empty message.

    Postgres attaches a CONTEXT line to every error raised in PL/pgSQL, so a server error
    never reaches psycopg without text; errors psycopg raises itself can. Everything else the
    pass does runs on the real session."""

    def __init__(self, conn: psycopg.Connection, statement: str) -> None:
        self._conn = conn
        self._statement = statement

    def execute(self, query, params=None):
        if query == self._statement:
            raise psycopg.errors.RaiseException()
        return self._conn.execute(query, params)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_an_entry_failing_with_an_empty_message_is_reported_not_a_crash(conn, t0):
    from jobqd.store.sql import queries

    config = settings(MINUTELY)
    set_last_tick(conn, ["once"], t0)
    failing = _FailingEnqueue(conn, queries("jobqd").cron_enqueue_tick)
    result = run_once(failing, config, now=t0 + timedelta(minutes=2, seconds=1))
    assert result.failed == {"once": "RaiseException"}
    assert jobs(conn, "t.once") == []
    # The failed firing left nothing behind: the next pass fires what was due.
    again = run_once(conn, config, now=t0 + timedelta(minutes=2, seconds=1))
    assert again.failed == {} and len(again.fired["once"]) == len(jobs(conn, "t.once")) > 0

"""Cron tick computation without a database: fields, seconds, time zones, DST, misfire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobqd.maintenance.cron import Schedule, due_ticks, tick_text


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def ticks(expression: str, timezone: str, after: datetime, until: datetime) -> list[datetime]:
    return Schedule(expression, timezone).between(after, until)


def test_five_fields_in_utc():
    got = ticks("*/15 * * * *", "UTC", utc(2026, 5, 1, 10, 0), utc(2026, 5, 1, 11, 0))
    assert got == [utc(2026, 5, 1, 10, m) for m in (15, 30, 45)] + [utc(2026, 5, 1, 11, 0)]


def test_six_fields_have_seconds_first():
    got = ticks("*/20 * * * * *", "UTC", utc(2026, 5, 1, 10, 0, 0), utc(2026, 5, 1, 10, 1, 0))
    assert got == [utc(2026, 5, 1, 10, 0, 20), utc(2026, 5, 1, 10, 0, 40), utc(2026, 5, 1, 10, 1)]


def test_between_excludes_after_and_includes_until_and_respects_limit():
    schedule = Schedule("* * * * * *")
    start = utc(2026, 5, 1, 10, 0, 0)
    assert schedule.between(start, start + timedelta(seconds=3)) == [
        start + timedelta(seconds=n) for n in (1, 2, 3)
    ]
    assert len(schedule.between(start, start + timedelta(hours=1), limit=10)) == 10


def test_local_time_zone_without_dst_change():
    # 03:00 in Berlin in summer is 01:00 UTC.
    got = ticks("0 3 * * *", "Europe/Berlin", utc(2026, 7, 1), utc(2026, 7, 3))
    assert got == [utc(2026, 7, 1, 1), utc(2026, 7, 2, 1)]


def test_spring_forward_nonexistent_time_fires_once_at_the_end_of_the_gap():
    # Berlin 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist.
    got = ticks("30 2 * * *", "Europe/Berlin", utc(2026, 3, 27, 12), utc(2026, 3, 30, 12))
    assert got == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # the first instant after the gap: 03:00 CEST
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]


def test_spring_forward_hourly_has_no_duplicate_tick():
    got = ticks("0 * * * *", "Europe/Berlin", utc(2026, 3, 28, 23, 30), utc(2026, 3, 29, 2, 30))
    assert got == [utc(2026, 3, 29, 0), utc(2026, 3, 29, 1), utc(2026, 3, 29, 2)]


def test_fall_back_repeated_time_fires_once_at_its_first_occurrence():
    # Berlin 2026-10-25: 03:00 CEST falls back to 02:00 CET (01:00 UTC); 02:30 happens twice.
    got = ticks("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12), utc(2026, 10, 26, 12))
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_fall_back_hourly_skips_the_repeated_hour():
    got = ticks("0 * * * *", "Europe/Berlin", utc(2026, 10, 24, 21, 30), utc(2026, 10, 25, 2, 30))
    # 00:00 CEST, 01:00 CEST, 02:00 CEST, (02:00 CET is the repeat), 03:00 CET
    expected = [(10, 24, 22), (10, 24, 23), (10, 25, 0), (10, 25, 2)]
    assert got == [utc(2026, *moment) for moment in expected]


def test_new_york_transitions():
    # 2026-03-08 02:00 EST -> 03:00 EDT (07:00 UTC); 2026-11-01 02:00 EDT -> 01:00 EST.
    spring = ticks("30 2 * * *", "America/New_York", utc(2026, 3, 8), utc(2026, 3, 9))
    assert spring == [utc(2026, 3, 8, 7)]
    fall = ticks("30 1 * * *", "America/New_York", utc(2026, 11, 1), utc(2026, 11, 2))
    assert fall == [utc(2026, 11, 1, 5, 30)]  # 01:30 EDT, not again at 01:30 EST


def test_iteration_from_inside_the_repeated_hour():
    schedule = Schedule("*/15 * * * *", "Europe/Berlin")
    inside = utc(2026, 10, 25, 1, 40)  # 02:40 CET, the second pass
    assert schedule.next_after(inside) == utc(2026, 10, 25, 2, 0)  # 03:00 CET
    assert schedule.latest_until(inside) == utc(2026, 10, 25, 0, 45)  # 02:45 CEST
    assert schedule.between(inside, utc(2026, 10, 25, 2, 20)) == [
        utc(2026, 10, 25, 2, 0),
        utc(2026, 10, 25, 2, 15),
    ]


def test_latest_until_is_inclusive():
    schedule = Schedule("*/5 * * * * *")
    assert schedule.latest_until(utc(2026, 5, 1, 10, 0, 10)) == utc(2026, 5, 1, 10, 0, 10)
    assert schedule.latest_until(utc(2026, 5, 1, 10, 0, 9, 999)) == utc(2026, 5, 1, 10, 0, 5)


def test_schedule_that_never_matches_again():
    schedule = Schedule("0 0 30 2 *")
    assert schedule.next_after(utc(2026, 1, 1)) is None
    assert schedule.between(utc(2026, 1, 1), utc(2027, 1, 1)) == []


MINUTELY = Schedule("* * * * *")
LAST = utc(2026, 5, 1, 10, 0)


@pytest.mark.parametrize(
    ("misfire", "now", "expected"),
    [
        ("skip", utc(2026, 5, 1, 10, 10, 30), []),
        ("skip", utc(2026, 5, 1, 10, 10, 3), [utc(2026, 5, 1, 10, 10)]),
        ("once", utc(2026, 5, 1, 10, 10, 30), [utc(2026, 5, 1, 10, 10)]),
        ("once", utc(2026, 5, 1, 10, 10, 3), [utc(2026, 5, 1, 10, 9), utc(2026, 5, 1, 10, 10)]),
        ("all", utc(2026, 5, 1, 10, 10, 30), [utc(2026, 5, 1, 10, m) for m in range(1, 11)]),
    ],
)
def test_misfire_policies_after_downtime(misfire, now, expected):
    assert due_ticks(MINUTELY, LAST, now, misfire=misfire) == expected


def test_all_is_bounded_by_window_and_limit():
    now = utc(2026, 5, 1, 10, 10, 30)
    assert due_ticks(MINUTELY, LAST, now, misfire="all", window=300) == [
        utc(2026, 5, 1, 10, m) for m in range(6, 11)
    ]
    assert due_ticks(MINUTELY, LAST, now, misfire="all", limit=3) == [
        utc(2026, 5, 1, 10, m) for m in (1, 2, 3)
    ]


@pytest.mark.parametrize("misfire", ["skip", "once", "all"])
def test_new_entry_fires_nothing_from_before_it_was_seen(misfire):
    seen = utc(2026, 5, 1, 10, 10, 1)
    assert due_ticks(MINUTELY, seen, utc(2026, 5, 1, 10, 10, 3), misfire=misfire) == []
    assert due_ticks(MINUTELY, seen, utc(2026, 5, 1, 10, 11, 2), misfire=misfire) == [
        utc(2026, 5, 1, 10, 11)
    ]


def test_nothing_is_due_twice():
    now = utc(2026, 5, 1, 10, 10, 3)
    for misfire in ("skip", "once", "all"):
        assert due_ticks(MINUTELY, utc(2026, 5, 1, 10, 10), now, misfire=misfire) == []


def test_tick_text_is_utc_with_z():
    assert tick_text(utc(2026, 5, 1, 10, 0, 1)) == "2026-05-01T10:00:01Z"

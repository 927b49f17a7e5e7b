"""Cron: when each entry's ticks fall, which of them are due, and firing them exactly once.

A tick is an instant, stored in UTC. Schedules are evaluated on the wall clock of the entry's
time zone, with one rule for daylight saving time: a wall-clock time that does not exist
(clocks spring forward over it) fires once, at the first instant after the gap; a wall-clock
time that happens twice (clocks fall back) fires once, at its first occurrence. Entries that
must fire every real hour through a DST change should use UTC.

Firing a tick inserts its `cron_ticks` row (primary key: entry name and tick) and enqueues its
job in one transaction, and moves the entry's `last_tick` on in that same transaction, so no
tick fires twice, not even with two leaders at once, and none is lost to a failed insert:
a tick whose insert failed is owed, and every later pass fires it first, whatever the
misfire policy and however late, until it has fired.
The job gets the entry's args plus `cron_tick`, the tick's instant in ISO 8601 UTC.

After downtime, `misfire` decides what happens to ticks older than the on-time tolerance
(which covers a leader failover, see `on_time`):
`skip` drops them, `once` fires the latest of them, `all` fires each one within
`misfire_window` (at most `LIMIT` per pass; the next pass continues). An entry is due from
when the leader first saw it, so a new entry fires no tick from before it existed, and one
that never fired yet loses no tick to a leader change.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from croniter import CroniterBadDateError, croniter

from jobqd.config.settings import CronSettings, Settings
from jobqd.errors import JobqdError, first_line
from jobqd.maintenance.duty import Duty, Result
from jobqd.observe.metrics import JobqdMetrics
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.cron")

ON_TIME = 5.0  # seconds: a tick this late still fires under `skip`
LIMIT = 1000  # ticks of one entry per pass
_WAKE_EARLY = 0.005  # aim this far past a cron tick, so the database clock has reached it


class UnknownEntry(JobqdError, LookupError):
    """No cron entry of that name in the config."""


class Schedule:
    """A cron expression on the wall clock of one time zone, answering in UTC instants."""

    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        self.expression = expression
        self.tz = ZoneInfo(timezone)
        self._utc = timezone in ("UTC", "Etc/UTC")
        self._seconds = len(expression.split()) == 6

    def _iter(self, start: datetime) -> croniter:
        return croniter(self.expression, start, second_at_beginning=self._seconds)

    def _wall(self, instant: datetime) -> datetime:
        return instant.astimezone(self.tz).replace(tzinfo=None, fold=0)

    def _instant(self, wall: datetime) -> datetime:
        """The UTC instant a wall-clock time stands for, by the DST rule above."""
        if self._utc:
            return wall.replace(tzinfo=UTC)
        first = wall.replace(tzinfo=self.tz, fold=0).astimezone(UTC)
        if self._wall(first) == wall:
            return first  # exists; if it happens twice, fold=0 is its first occurrence
        # In a gap: fold=0 reads it with the offset before the change (a later instant),
        # fold=1 with the one after; the change lies between them, at a whole second.
        low = int(wall.replace(tzinfo=self.tz, fold=1).timestamp())
        high = int(first.timestamp())
        after = datetime.fromtimestamp(high, UTC).astimezone(self.tz).utcoffset()
        while high - low > 1:
            middle = (low + high) // 2
            if datetime.fromtimestamp(middle, UTC).astimezone(self.tz).utcoffset() == after:
                high = middle
            else:
                low = middle
        return datetime.fromtimestamp(high, UTC)

    def between(self, after: datetime, until: datetime, limit: int = LIMIT) -> list[datetime]:
        """Ticks t with after < t <= until, earliest first, at most `limit`."""
        ticks: list[datetime] = []
        iterator = self._iter(self._wall(after))
        try:
            while len(ticks) < limit:
                tick = self._instant(iterator.get_next(datetime))
                if tick > until:
                    break
                # Wall times of a repeated hour's second pass map to their first occurrence,
                # before `after`; times in a gap all map to its end: skip both.
                if tick > after and (not ticks or tick > ticks[-1]):
                    ticks.append(tick)
        except CroniterBadDateError:  # a schedule that never matches again (e.g. Feb 30)
            pass
        return ticks

    def next_after(self, instant: datetime) -> datetime | None:
        """The first tick strictly after `instant`."""
        iterator = self._iter(self._wall(instant))
        try:
            while True:
                tick = self._instant(iterator.get_next(datetime))
                if tick > instant:
                    return tick
        except CroniterBadDateError:
            return None

    def latest_until(self, instant: datetime) -> datetime | None:
        """The last tick at or before `instant`."""
        local = instant.astimezone(self.tz)
        wall = local.replace(tzinfo=None, fold=0)
        if local.fold:  # second pass of a repeated hour: start above the whole repeat
            wall += local.replace(fold=0).utcoffset() - local.utcoffset()
        iterator = self._iter(wall + timedelta(microseconds=1))
        try:
            while True:
                tick = self._instant(iterator.get_prev(datetime))
                if tick <= instant:
                    return tick
        except CroniterBadDateError:
            return None


@functools.lru_cache(maxsize=256)
def schedule_of(expression: str, timezone: str) -> Schedule:
    return Schedule(expression, timezone)


def _schedule(entry: CronSettings) -> Schedule:
    return schedule_of(entry.schedule, entry.timezone)


def due_ticks(
    schedule: Schedule,
    since: datetime,
    now: datetime,
    *,
    misfire: str = "skip",
    window: float = 3600.0,
    on_time: float = ON_TIME,
    limit: int = LIMIT,
) -> list[datetime]:
    """The ticks to fire now, earliest first.

    Ticks after `since` (the entry's last fired tick, or when it was first seen) and at most
    `now` are due; those later than `now - on_time` are on time and always fire, older ones
    were missed and `misfire` decides.
    """
    cutoff = now - timedelta(seconds=on_time)
    if misfire == "all":
        start = max(since, now - timedelta(seconds=max(window, on_time)))
        return schedule.between(start, now, limit)
    ticks = schedule.between(max(since, cutoff), now, limit)
    if misfire == "once":
        missed = schedule.latest_until(cutoff)
        if missed is not None and missed > since:
            ticks = [missed, *ticks][:limit]
    return ticks


def tick_text(tick: datetime) -> str:
    """A tick in ISO 8601 UTC with a Z, as jobs see it in args["cron_tick"]."""
    return tick.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _args(entry: CronSettings, tick: datetime) -> str:
    return json.dumps({**entry.args, "cron_tick": tick_text(tick)}, separators=(",", ":"))


def on_time(settings: Settings) -> float:
    """How late a tick may fire and still count as on time: the leader ticks every
    `maintenance.interval`, so allow two of those, and never less than ON_TIME; and a leader
    that froze or was cut off keeps the lock up to `leader_timeout`, after which a standby
    takes over at its next try (`standby_retry`, with jitter), so the ticks of that gap are
    on time too and fire under every misfire policy."""
    maintenance = settings.maintenance
    failover = maintenance.leader_timeout + 2 * maintenance.standby_retry
    return max(ON_TIME, 2 * maintenance.interval + failover)


@dataclass
class CronPass:
    """What one pass did: job ids fired per entry, entries that failed, the next tick due."""

    now: datetime | None = None
    fired: dict[str, list[int]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    next_tick: datetime | None = None


def run_once(
    conn: psycopg.Connection,
    settings: Settings,
    *,
    metrics: JobqdMetrics | None = None,
    now: datetime | None = None,
    owed: dict[str, list[datetime]] | None = None,
) -> CronPass:
    """Fire every enabled entry's due ticks on `conn` (the leader session).

    `now` replaces the database time, for tests only. An entry whose firing fails with a
    data error (say, args over the payload limit) is logged and left for the next pass; a
    connection error is raised, since the caller must step down. Either way the ticks that
    failed are added to `owed` (entry name -> ticks), which the next pass fires first.
    """
    owed = {} if owed is None else owed
    sql = queries(settings.database.schema)
    entries = {name: e for name, e in settings.cron.items() if e.enabled}
    result = CronPass()
    if not entries:
        return result
    row = conn.execute(sql.cron_state, {"names": list(entries)}).fetchone()
    assert row is not None
    db_now, names, sinces = row
    clock = now or db_now
    since = dict(zip(names or (), sinces or (), strict=True))
    new = [name for name in entries if name not in since]
    if new:  # first seen now: due from now on
        conn.execute(sql.cron_add_entries, {"names": new})
    tolerance = on_time(settings)
    for name, entry in entries.items():
        if name not in since:
            continue
        due = due_ticks(
            _schedule(entry),
            since[name],
            clock,
            misfire=entry.misfire,
            window=entry.misfire_window,
            on_time=tolerance,
        )
        if due or owed.get(name):
            # Owed until the commit that fires them, also if the session dies before that.
            owed[name] = sorted({*owed.get(name, ()), *due})
            try:
                fired = _fire_due(conn, sql, name, entry, tolerance, now, owed)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except psycopg.Error as exc:
                result.failed[name] = first_line(exc)
                log.error(
                    "cron entry %s could not fire: %s",
                    name,
                    result.failed[name],
                    extra=_fields(name, entry),
                )
                continue
            if fired:
                result.fired[name] = [job_id for _, job_id in fired]
                if metrics is not None:
                    metrics.cron_fires.inc(name, amount=len(fired))
                for tick, job_id in fired:
                    log.info(
                        "cron %s fired tick %s",
                        name,
                        tick_text(tick),
                        extra={**_fields(name, entry), "job_id": job_id, "attempt": 0},
                    )
    result.now = clock
    upcoming = [t for e in entries.values() if (t := _schedule(e).next_after(clock)) is not None]
    result.next_tick = min(upcoming, default=None)
    return result


class Cron(Duty):
    """The cron duty: fires due ticks every `maintenance.interval`, and is due again at the
    next tick of any entry when that comes sooner, so ticks fire on time."""

    name = "cron"

    def __init__(self, settings: Settings, metrics: JobqdMetrics | None = None) -> None:
        super().__init__(settings, metrics)
        self.owed: dict[str, list[datetime]] = {}  # ticks whose insert failed, per entry

    def run(self, conn: psycopg.Connection) -> Result:
        fired = run_once(conn, self.settings, metrics=self.metrics, owed=self.owed)
        again = self.settings.maintenance.interval
        if fired.next_tick is not None and fired.now is not None:
            wait = (fired.next_tick - fired.now).total_seconds() + _WAKE_EARLY
            again = min(again, max(0.0, wait))
        counts = {"fired": sum(map(len, fired.fired.values())), "failed": len(fired.failed)}
        return Result(counts, again)


def _fields(name: str, entry: CronSettings) -> dict[str, Any]:
    return {"cron": name, "queue": entry.queue, "task": entry.task}


def _fire_due(
    conn: psycopg.Connection,
    sql: Any,
    name: str,
    entry: CronSettings,
    tolerance: float,
    now: datetime | None,
    owed: dict[str, list[datetime]],
) -> list[tuple[datetime, int]]:
    """Under the entry's row lock, recompute what is due, add what is owed, and fire it;
    commit moves the entry on and settles the debt. If anything fails, all of it is owed."""
    fired = []
    due: list[datetime] = list(owed.get(name, ()))
    try:
        with conn.transaction():
            row = conn.execute(sql.cron_lock_entry, {"name": name}).fetchone()
            assert row is not None
            since, db_now = row
            scheduled = due_ticks(
                _schedule(entry),
                since,
                now or db_now,
                misfire=entry.misfire,
                window=entry.misfire_window,
                on_time=tolerance,
            )
            # Owed ticks at or before `since` were fired meanwhile (by another leader).
            due = sorted({*(t for t in due if t > since), *scheduled})
            for tick in due:
                job_id = _enqueue_tick(conn, sql, name, entry, tick, manual=False)
                if job_id is not None:
                    fired.append((tick, job_id))
            if due:
                conn.execute(sql.cron_advance, {"name": name, "tick": due[-1]})
    except BaseException:
        owed[name] = due
        raise
    owed.pop(name, None)
    return fired


def _enqueue_tick(
    conn: psycopg.Connection,
    sql: Any,
    name: str,
    entry: CronSettings,
    tick: datetime | None,
    *,
    manual: bool,
) -> int | None:
    """Claim the tick's row and enqueue its job; None when the tick had already fired."""
    claimed = conn.execute(
        sql.cron_claim_tick, {"name": name, "tick": tick, "manual": manual}
    ).fetchone()
    if claimed is None:
        return None
    row = conn.execute(
        sql.cron_enqueue_tick,
        {
            "name": name,
            "tick": claimed[0],
            "queue": entry.queue,
            "task": entry.task,
            "args": _args(entry, claimed[0]),
            "priority": entry.priority,
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def _entry(settings: Settings, name: str) -> CronSettings:
    entry = settings.cron.get(name)
    if entry is None:
        known = ", ".join(sorted(settings.cron)) or "none configured"
        raise UnknownEntry(f"no cron entry named {name!r} (entries: {known})")
    return entry


def fire_now(conn: psycopg.Connection, settings: Settings, name: str) -> int:
    """Enqueue entry `name`'s job now, as a manual tick at the database time; returns the job
    id. The schedule is not affected; disabled entries can be run this way too."""
    entry = _entry(settings, name)
    sql = queries(settings.database.schema)
    for _ in range(3):  # a scheduled tick at the very same microsecond: take the next one
        with conn.transaction():
            job_id = _enqueue_tick(conn, sql, name, entry, None, manual=True)
        if job_id is not None:
            log.info(
                "cron %s run by hand",
                name,
                extra={**_fields(name, entry), "job_id": job_id, "attempt": 0},
            )
            return job_id
    raise JobqdError(f"cron entry {name!r}: could not record a manual tick; try again")


def cron_status(conn: psycopg.Connection, settings: Settings) -> list[dict[str, Any]]:
    """Every configured entry with its last fired tick (and that tick's job) and next tick."""
    sql = queries(settings.database.schema)
    names = sorted(settings.cron)
    if not names:
        return []
    rows = conn.execute(sql.cron_entries, {"names": names}).fetchall()
    by_name: Mapping[str, tuple[Any, ...]] = {row[1]: row for row in rows}
    status = []
    for name in names:
        entry = settings.cron[name]
        db_now, _, last_tick, last_job_id = by_name[name]
        next_tick = _schedule(entry).next_after(db_now) if entry.enabled else None
        status.append(
            {
                "name": name,
                "schedule": entry.schedule,
                "timezone": entry.timezone,
                "task": entry.task,
                "queue": entry.queue,
                "enabled": entry.enabled,
                "misfire": entry.misfire,
                "last_tick": last_tick,
                "last_job_id": last_job_id,
                "next_tick": next_tick,
            }
        )
    return status

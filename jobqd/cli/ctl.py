"""`jobqctl`: look at the queues and act on them, from any host that reaches the database.

Thin on purpose: parse the command line, call jobqd.store (admin, jobs, queues) over one session,
print a table (or `--json`, one document). Exit codes: 0 ok, 1 not found or nothing matched,
2 usage, 3 database unreachable; each failure prints one line saying what to do next.
"""

from __future__ import annotations

import argparse
import getpass
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd import __version__
from jobqd import config as config_module
from jobqd.cli import output
from jobqd.cli import roll as rolling
from jobqd.config.durations import format_duration, parse_duration
from jobqd.config.settings import DatabaseHealthSettings, QueueSettings
from jobqd.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    DatabaseUnavailable,
    JobqdError,
    PayloadError,
    first_line,
)
from jobqd.store import admin, bundles, embedded, jobs, queues
from jobqd.store import connections as db

SYSTEM_CONFIG = Path(config_module.DEFAULT_CONFIG)
WATCH_INTERVAL = 2.0
DEFAULT_WAIT = 5.0
"""Seconds a command keeps trying to reach the database before it gives up (--wait)."""
ROLL_TIMEOUT = 300.0
"""Seconds `jobqctl roll` waits for each daemon's roll (--timeout)."""
RETRY_FIRST = 0.5
RETRY_CAP = 5.0
_TRANSIENT_REFUSALS = (
    "starting up",
    "shutting down",
    "not yet accepting connections",
    "recovery mode",
    "too many clients",
    "connection slots are reserved",
)
"""What a server that answered says when trying again later can help (its FATAL messages)."""
WAIT_POLL = 0.2  # `jobqctl wait`: seconds between looks at the jobs' states
WAIT_NOTE_EVERY = 10.0  # and between its progress lines on stderr
_CLEAR = "\x1b[H\x1b[2J"
_BULK_NOTICE = 10_000  # bulk changes of more rows than this say so before they start


class CtlError(Exception):
    """A failure with its exit code; the message is one line saying what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _usage(message: str) -> NoReturn:
    raise CtlError(EXIT_USAGE, message)


def _not_found(message: str) -> NoReturn:
    raise CtlError(EXIT_FAILURE, message)


@dataclass
class Context:
    """What every command gets: where the database is, the schema, the config if one was
    read, how to print."""

    dsn: str
    schema: str
    settings: config_module.Settings | None
    json: bool
    yes: bool
    out: TextIO
    err: TextIO
    origin: str = ""
    wait: float = DEFAULT_WAIT
    _conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None:
            self._conn = connect_waiting(self.dsn, self.wait, self.note)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def note(self, text: str) -> None:
        """Progress and remarks go to stderr, so stdout stays the command's answer."""
        self.err.write(text + "\n")
        self.err.flush()

    def emit(self, document: Any, human: Callable[[], str]) -> None:
        if self.json:
            output.emit_json(document, self.out)
        else:
            self.print(human())

    def confirm(self, question: str) -> None:
        """Ask on a terminal unless --yes; scripts (no terminal) are not asked."""
        if self.yes or not sys.stdin.isatty():
            return
        self.err.write(f"{question} [y/N] ")
        self.err.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            raise CtlError(EXIT_FAILURE, "nothing changed (not confirmed; pass --yes to skip)")

    def needs_settings(self, what: str) -> config_module.Settings:
        if self.settings is None:
            _usage(f"{what} needs the daemon's config file: pass -c FILE")
        return self.settings


# -- connection ------------------------------------------------------------------------------


def _load_config(path: str | os.PathLike[str]) -> config_module.Settings:
    try:
        return config_module.load(path)
    except config_module.ConfigError as exc:
        lines = exc.errors or [str(exc)]
        raise CtlError(EXIT_USAGE, "\n".join([*lines, f"fix {path} and try again"])) from None


def _database(settings: config_module.Settings) -> str:
    """The conninfo a config names; for the embedded server, the one running in its data
    directory, found as the daemon finds it. jobqctl never starts it: it runs while jobqd does."""
    database = settings.database
    if not database.is_embedded:
        return database.url
    url = embedded.find(database.data_dir)
    if url is None:
        raise CtlError(EXIT_UNREACHABLE, embedded.not_running(database.data_dir))
    return url


@dataclass(frozen=True)
class Target:
    """Where the commands go: the conninfo (it may hold a password), the schema, the config
    if one was read, and what named the database (for `jobqctl dsn --json`)."""

    dsn: str
    schema: str
    settings: config_module.Settings | None
    origin: str


def resolve(args: argparse.Namespace, env: os._Environ[str] | dict[str, str]) -> Target:
    """The database, the way jobqd finds it: -c FILE, --dsn URL, JOBQD_DATABASE_URL, the file
    $JOBQD_CONFIG names, /etc/jobqd.yaml; else the embedded server that jobqd runs when its
    config names no database (in the default data directory)."""
    settings = None
    named = env.get(config_module.CONFIG_ENV)
    if args.config:
        settings = _load_config(args.config)
        origin = f"-c {args.config}"
    elif args.dsn:
        dsn, origin = args.dsn, "--dsn"
    elif env.get("JOBQD_DATABASE_URL"):
        dsn, origin = env["JOBQD_DATABASE_URL"], "JOBQD_DATABASE_URL"
    elif named:
        settings = _load_config(named)
        origin = f"${config_module.CONFIG_ENV} ({named})"
    elif SYSTEM_CONFIG.exists():
        settings = _load_config(SYSTEM_CONFIG)
        origin = str(SYSTEM_CONFIG)
    else:
        data_dir = embedded.default_data_dir()
        found = embedded.find(data_dir)
        if found is None:
            _usage(
                "no database given: pass -c FILE or --dsn URL, set JOBQD_DATABASE_URL, or "
                f"create {SYSTEM_CONFIG}; no embedded PostgreSQL runs in {data_dir} either "
                "(it runs while `jobqd -c FILE` does, for a config that names no database)"
            )
        dsn, origin = found, f"the embedded PostgreSQL in {data_dir}"
    if settings is not None:
        dsn = _database(settings)
        if settings.database.is_embedded:
            origin += f" (the embedded PostgreSQL in {settings.database.data_dir})"
    schema = args.schema or (settings.database.schema if settings else "jobqd")
    return Target(dsn, schema, settings, origin)


def retry_delays(wait: float) -> list[float]:
    """The pauses between connection attempts within `wait` seconds: doubling from
    RETRY_FIRST up to RETRY_CAP, the last one cut to end at `wait`."""
    delays: list[float] = []
    total, delay = 0.0, RETRY_FIRST
    while total < wait - 1e-9:
        step = min(delay, wait - total)
        delays.append(step)
        total += step
        delay = min(delay * 2, RETRY_CAP)
    return delays


def connect_waiting(dsn: str, wait: float, note: Callable[[str], None]) -> psycopg.Connection:
    """One jobqctl session, trying again with backoff for up to `wait` seconds while the
    database cannot be reached (down, restarting, out of connection slots), with a progress
    line on stderr before each pause. A refusal that waiting cannot fix (authentication, no
    such database) fails at once. Either way the failure is exit 3 with what to check."""
    delays = retry_delays(wait)
    attempts = len(delays) + 1
    started = time.monotonic()
    attempt = 1
    while True:
        try:
            return db.connect(
                _bounded(dsn, started + wait - time.monotonic()),
                application_name="jobqctl",
                statement_timeout_ms=None,
            )
        except DatabaseUnavailable as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            if not _transient(cause):
                raise CtlError(EXIT_UNREACHABLE, str(exc)) from None
            left = started + wait - time.monotonic()
            if attempt == attempts or left <= 0:
                tried = f"{attempt} attempt{'s' if attempt != 1 else ''}"
                spent = format_duration(round(time.monotonic() - started, 1))
                longer = format_duration(max(60.0, 4 * wait))
                raise CtlError(
                    EXIT_UNREACHABLE,
                    f"{exc}; gave up after {tried} in {spent}: pass --wait {longer} to wait longer",
                ) from None
            pause = min(delays[attempt - 1], left)
            attempt += 1
            note(
                f"jobqctl: cannot reach the database at {db.location(dsn)}: {first_line(cause)}; "
                f"retrying in {format_duration(round(pause, 1))} ({attempt}/{attempts})"
            )
            time.sleep(pause)


def _bounded(dsn: str, remaining: float) -> str:
    """`dsn` with a connect_timeout that ends within the wait (libpq's least is 2s), unless
    the DSN sets its own. A malformed DSN is returned as it is: connecting says so, redacted."""
    try:
        if "connect_timeout" in conninfo_to_dict(dsn):
            return dsn
    except psycopg.ProgrammingError:
        return dsn
    return make_conninfo(dsn, connect_timeout=str(max(2, min(10, math.ceil(remaining)))))


def _transient(exc: BaseException) -> bool:
    """Whether trying again may help: the server did not answer, or answered "not now"."""
    text = str(exc)
    return "FATAL:" not in text or any(words in text for words in _TRANSIENT_REFUSALS)


# -- parsing helpers -------------------------------------------------------------------------


def _positive_whole_number(what: str) -> Callable[[str], int]:
    """An argparse type for ids and counts, whose error names what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(
                f"{what} must be a positive whole number, got {text!r}"
            )
        return value

    return parse


_job_id = _positive_whole_number("a job id")
_positive_int = _positive_whole_number("the value")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_duration(text: str) -> float:
    seconds = _duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration, e.g. 10m")
    return seconds


def _time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time like 2025-01-31T09:00:00+00:00, got {text!r}"
        ) from None
    return value if value.tzinfo else value.astimezone()


def _json_args(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--args is not valid JSON ({exc.msg} at character {exc.pos}): "
            """quote it for the shell, e.g. --args '{"user_id": 7}'"""
        ) from None


# -- commands --------------------------------------------------------------------------------


def _status_document(ctx: Context) -> dict[str, Any]:
    settings = ctx.settings
    return admin.status(
        ctx.conn,
        ctx.schema,
        stale_after=settings.reaper.process_grace if settings else admin.DEFAULT_STALE_AFTER,
        unknown_task_window=(
            settings.unknown_task_window if settings else admin.DEFAULT_UNKNOWN_TASK_WINDOW
        ),
    )


def _status_text(document: dict[str, Any]) -> str:
    queues = document["queues"]
    parts = []
    if queues:
        rows = [
            (
                q["queue"] + (" (paused)" if q["paused"] else ""),
                q["queued"],
                q["scheduled"],
                q["retrying"],
                q["running"],
                q["dead"],
                q["succeeded_1h"],
                output.age(q["oldest_age"]),
                q["per_minute"],
            )
            for q in queues
        ]
        headers = ("QUEUE", "QUEUED", "SCHEDULED", "RETRYING", "RUNNING", "DEAD", "OK/1H")
        headers += ("OLDEST", "JOBS/MIN")
        parts.append(output.table(headers, rows, right=range(1, 9)))
        parts += _paused_lines(queues, document["time"])
    else:
        parts.append("no queues yet: nothing was ever enqueued")
    parts.append("")
    procs = document["processes"]
    if procs:
        rows = [
            (
                p["host"],
                p["role"],
                p["queue"] or "-",
                p["pid"],
                output.age(p["heartbeat_age"]) + (" (stale)" if p["stale"] else ""),
                output.age(_seconds_between(p["started_at"], document["time"])),
            )
            for p in procs
        ]
        headers = ("HOST", "ROLE", "QUEUE", "PID", "HEARTBEAT", "UP")
        parts.append(output.table(headers, rows, right=(3,)))
    else:
        parts.append("no live processes: is jobqd running?")
    parts += _unhandled_lines(document.get("unhandled") or ())
    for loop in document.get("crash_loops") or ():
        parts.append(
            f"crash loop: {loop['host']} {loop['child']}: {loop['crash_loop']} "
            f"(last: {loop['last_exit']}; {loop['restarts']} restarts): see that node's log"
        )
    parts += [_roll_line(entry) for entry in document.get("rolls") or ()]
    leader = document["leader"]
    if leader is None:
        parts.append("leader: none (no maintenance process holds the leader lock)")
    elif leader.get("host"):
        parts.append(f"leader: {leader['host']} pid {leader['pid']}")
    else:
        parts.append(
            f"leader: database backend {leader.get('backend_pid')} (process not registered)"
        )
    return "\n".join(parts)


def _paused_lines(queues: Iterable[dict[str, Any]], now: datetime) -> list[str]:
    """Who paused each paused queue, when, and until when."""
    lines = []
    for q in queues:
        if not q["paused"]:
            continue
        by = f" by {q['paused_by']}" if q.get("paused_by") else ""
        since = f" at {output.when(q['paused_at'])}" if q.get("paused_at") else ""
        until = q.get("paused_until")
        ends = (
            f", until {output.when(until)} (resumes by itself in "
            f"{output.age(_seconds_between(now, until))})"
            if until is not None
            else f", until `jobqctl resume {q['queue']}`"
        )
        lines.append(f"paused: {q['queue']}{by}{since}{ends}")
    return lines


def _roll_line(entry: dict[str, Any]) -> str:
    """A node whose roll is under way or stopped halfway (admin.rolls)."""
    node = f"roll: {entry['host']} master {entry['master_pid']}"
    workers = {int(n): count for n, count in entry["workers"].items()}
    newest = max(workers, default=0)
    older = sum(count for n, count in workers.items() if n < newest)
    roll = entry["roll"]
    if roll and roll.get("state") in ("checking", "rolling"):
        doing = ", ".join(roll.get("replacing") or ()) or "-"
        return (
            f"{node}: roll {roll['number']} {roll['state']}, {roll['replaced']}/{roll['total']}"
            f" workers replaced (replacing: {doing})"
        )
    if roll and roll.get("state") == "failed":
        return (
            f"{node}: roll {roll['number']} stopped: {roll.get('error')}; {older} worker(s) "
            "still run earlier code: fix it and `jobqctl roll` again on that host"
        )
    return (
        f"{node}: {workers.get(newest, 0)} worker(s) run roll {newest}'s code, {older} earlier "
        "code (a roll is under way or stopped: see that node's log)"
    )


def _unhandled_lines(groups: Iterable[dict[str, Any]]) -> list[str]:
    """One line per queue and task whose jobs no worker knows how to run."""
    return [
        f"unhandled: {g['jobs']} job(s) of task {g['task']!r} in queue {g['queue']}: no worker "
        f"knows the task (for {output.age(g['unhandled_for'])}; dead in "
        f"{output.age(g['dead_in'])}): deploy a worker whose imports register it, or cancel them"
        for g in groups
    ]


def _status_with_database(ctx: Context) -> dict[str, Any]:
    return {**_status_document(ctx), "database": _database_document(ctx)}


def _status_with_database_text(document: dict[str, Any]) -> str:
    return _status_text(document) + "\n\n" + _database_text(document["database"])


def _database_document(ctx: Context) -> dict[str, Any]:
    """What holds back vacuum and how many dead tuples jobqd's tables carry, with warnings
    over the config's `database_health` thresholds (their defaults without -c)."""
    thresholds = ctx.settings.database_health if ctx.settings else DatabaseHealthSettings()
    return admin.database_health(ctx.conn, ctx.schema, thresholds)


def _database_text(health: dict[str, Any]) -> str:
    holder = health["vacuum_holder"]
    if holder is None:
        lines = ["vacuum: nothing holds it back"]
    else:
        age = output.age(holder["age"]) if holder["age"] is not None else "age hidden"
        lines = [
            f"vacuum held back by: {admin.describe_holder(holder)}, {age}, "
            f"{holder['xid_age']:,} transactions"
        ]
    shown = [t for t in health["tables"] if t["dead_tuples"] or t["table"].endswith(".jobs")]
    rows = [
        (
            t["table"],
            t["live_tuples"],
            t["dead_tuples"],
            _vacuumed(t),
        )
        for t in shown
    ]
    lines.append(output.table(("TABLE", "LIVE", "DEAD", "LAST VACUUM"), rows, right=(1, 2)))
    lines += [f"warning: {warning}" for warning in health["warnings"]]
    if health["warnings"]:
        lines.append('(what to do: docs/operations.md, "Vacuum held back")')
    return "\n".join(lines)


def _vacuumed(table: dict[str, Any]) -> str:
    if table["vacuumed_at"] is None:
        return "never"
    how = "autovacuum" if table["vacuumed_at"] == table["last_autovacuum"] else "VACUUM"
    return f"{output.age(table['vacuum_age'])} ago ({how})"


def _seconds_between(start: datetime | None, end: datetime) -> float | None:
    return None if start is None else (end - start).total_seconds()


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    if not args.watch:
        document = _status_with_database(ctx)
        ctx.emit(document, lambda: _status_with_database_text(document))
        return EXIT_OK
    try:
        while True:
            try:
                document = _status_with_database(ctx)
            except psycopg.OperationalError as exc:
                ctx.close()  # the next round reconnects, trying for up to --wait
                ctx.note(f"jobqctl: lost the database connection: {first_line(exc)}")
                time.sleep(args.interval)
                continue
            stamp = output.when(document["time"])
            if ctx.json:
                ctx.print(json.dumps(document, default=output._default, ensure_ascii=False))
            else:
                ctx.out.write(_CLEAR)
                ctx.print(f"jobqctl status  {stamp}  every {args.interval:g}s, Ctrl-C to stop\n")
                ctx.print(_status_with_database_text(document))
            ctx.out.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_workers(ctx: Context, args: argparse.Namespace) -> int:
    document = _status_document(ctx)
    procs = document["processes"]

    def human() -> str:
        if not procs:
            return "no live processes: is jobqd running?"
        leader = document["leader"] or {}
        rows = [
            (
                p["id"],
                p["host"],
                p["role"] + (" (leader)" if p["id"] == leader.get("id") else ""),
                p["queue"] or "-",
                p["pid"],
                output.age(p["heartbeat_age"]) + (" (stale)" if p["stale"] else ""),
                output.when(p["started_at"]),
            )
            for p in procs
        ]
        headers = ("ID", "HOST", "ROLE", "QUEUE", "PID", "HEARTBEAT", "STARTED")
        return output.table(headers, rows, right=(0, 4))

    ctx.emit({"processes": procs, "leader": document["leader"]}, human)
    return EXIT_OK


def _attempt_limit(ctx: Context, job: dict[str, Any]) -> int:
    """The attempt limit that applies to `job`: the job's, its task's or route's, its queue's
    as the daemons published them, else this config's (or the built-in) queue default."""
    if job["effective_max_attempts"] is not None:
        return int(job["effective_max_attempts"])
    queue = ctx.settings.queues.get(job["queue"]) if ctx.settings else None
    return (queue or QueueSettings()).max_attempts


def cmd_jobs(ctx: Context, args: argparse.Namespace) -> int:
    found = admin.jobs(ctx.conn, ctx.schema, queue=args.queue, state=args.state, limit=args.limit)

    def human() -> str:
        if not found:
            return "no jobs match"
        rows = [
            (
                j["id"],
                j["queue"],
                j["task"],
                j["state"],
                f"{j['attempt']}/{_attempt_limit(ctx, j)}",
                output.when(j["run_at"]),
                j["last_error"] or "",
            )
            for j in found
        ]
        headers = ("ID", "QUEUE", "TASK", "STATE", "ATTEMPT", "RUN AT", "LAST ERROR")
        return output.table(headers, rows, right=(0,))

    ctx.emit(found, human)
    return EXIT_OK if found else EXIT_FAILURE


def _show_text(job: dict[str, Any], limit: int) -> str:
    process = job["process"]
    if not process:
        held_by = job["locked_by"]
    elif process["role"] == "external":  # a worker of the SQL or HTTP protocol, by its name
        held_by = f"external worker {process['host']!r}"
    else:
        held_by = f"{process['host']} pid {process['pid']}"
    pairs = [
        ("id", job["id"]),
        ("queue", job["queue"]),
        ("task", job["task"]),
        ("state", job["state"]),
        ("attempt", f"{job['attempt']} of {limit}"),
        ("priority", job["priority"]),
        ("run at", job["run_at"]),
        ("created at", job["created_at"]),
        ("started at", job["started_at"]),
        ("finished at", job["finished_at"]),
        ("lease until", job["lease_expires_at"]),
        ("held by", held_by),
        ("dedup key", job["dedup_key"]),
        ("idempotency key", job["idempotency_key"]),
        ("bundle", job["bundle_id"]),
    ]
    lines = [output.fields(pairs), "", "args:"]
    lines += _indented(json.dumps(job["args"], indent=2, ensure_ascii=False))
    if job["result"] is not None:
        lines += ["result:", *_indented(json.dumps(job["result"], indent=2, ensure_ascii=False))]
    errors = job["errors"] or []
    if errors:
        lines += ["", f"errors ({len(errors)}, oldest first):"]
        for error in errors:
            kind, message = error.get("kind") or "Error", error.get("message") or ""
            said = message if message.startswith(kind) else f"{kind}: {message}"
            lines.append(f"  attempt {error.get('attempt', '?')}: {said}")
            if error.get("traceback"):
                lines += _indented(error["traceback"].rstrip(), "      ")
    elif job["last_error"]:
        lines += ["", f"last error: {job['last_error']}"]
    return "\n".join(lines)


def _indented(text: str, prefix: str = "  ") -> list[str]:
    return [prefix + line for line in text.splitlines()]


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    job = admin.job(ctx.conn, ctx.schema, args.id)
    if job is None:
        _not_found(f"no job {args.id}: check the id with `jobqctl jobs` (it may have been pruned)")
    ctx.emit(job, lambda: _show_text(job, _attempt_limit(ctx, job)))
    return EXIT_OK


def _by_ids(
    ctx: Context, ids: Sequence[int], verb: str, act: Callable[..., list[int]], allowed: str
) -> int:
    changed = act(ctx.conn, ctx.schema, ids)
    skipped = [i for i in ids if i not in set(changed)]
    found = jobs.states(ctx.conn, ctx.schema, skipped) if skipped else {}
    reasons = {i: (f"is {found[i]}" if i in found else "not found") for i in skipped}
    document = {verb: changed, "skipped": [{"id": i, "reason": r} for i, r in reasons.items()]}

    def human() -> str:
        lines = [f"{verb} {len(changed)} of {len(ids)} job{'s' if len(ids) != 1 else ''}"]
        lines += [f"  job {i}: {r} ({allowed})" for i, r in reasons.items()]
        return "\n".join(lines)

    ctx.emit(document, human)
    return EXIT_OK if changed else EXIT_FAILURE


def _bulk(
    ctx: Context,
    args: argparse.Namespace,
    verb: str,
    act: Callable[..., int],
    states: Sequence[str],
) -> int:
    if args.ids:
        _usage("give job ids or --queue/--state, not both")
    if not args.queue or not args.state:
        _usage(f"{verb} needs job ids, or --queue Q --state {'|'.join(states)}")
    if args.state not in states:
        _usage(f"{verb} works on {' or '.join(states)} jobs, not {args.state}")
    count = jobs.count_in_state(ctx.conn, ctx.schema, args.queue, args.state)
    if count == 0:
        _not_found(f"no {args.state} jobs in queue {args.queue!r}: nothing to {verb}")
    ctx.confirm(
        f"{verb} {count} {args.state} job{'s' if count != 1 else ''} of queue {args.queue!r}?"
    )
    if count > _BULK_NOTICE:
        ctx.note(f"{verb} {count} jobs: this can take a while…")
    changed = act(ctx.conn, ctx.schema, args.queue, args.state)
    past = "retried" if verb == "retry" else "cancelled"
    document = {"queue": args.queue, "state": args.state, past: changed}
    ctx.emit(document, lambda: f"{past} {changed} {args.state} jobs of queue {args.queue!r}")
    return EXIT_OK if changed else EXIT_FAILURE


def cmd_retry(ctx: Context, args: argparse.Namespace) -> int:
    if args.ids and not (args.queue or args.state):
        return _by_ids(ctx, args.ids, "retried", admin.retry, "only dead, cancelled or queued")
    return _bulk(ctx, args, "retry", admin.retry_queue, admin.RETRYABLE_STATES)


def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    if args.ids and not (args.queue or args.state):
        return _by_ids(ctx, args.ids, "cancelled", admin.cancel, "only queued or running")
    return _bulk(ctx, args, "cancel", admin.cancel_queue, admin.CANCELLABLE_STATES)


def cmd_delete(ctx: Context, args: argparse.Namespace) -> int:
    return _by_ids(ctx, args.ids, "deleted", jobs.delete, "running jobs: cancel them first")


def _operator() -> str:
    """Who is pausing, as jobqctl status shows it: the login user and this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def cmd_pause(ctx: Context, args: argparse.Namespace) -> int:
    if not args.force and not queues.known(ctx.conn, ctx.schema, args.queue):
        _not_found(
            f"no queue {args.queue!r}: no daemon serves it, no task names it and it has no "
            "jobs; check the name with `jobqctl status`, or pass --force to pause it anyway"
        )
    by = args.by or _operator()
    until = queues.pause(ctx.conn, ctx.schema, args.queue, duration=args.duration, paused_by=by)
    lasts = (
        f"for {format_duration(args.duration)} (until {output.when(until)}), then it resumes "
        "by itself"
        if args.duration is not None
        else "until resumed"
    )
    ctx.emit(
        {"queue": args.queue, "paused": True, "paused_by": by, "paused_until": until},
        lambda: (
            f"queue {args.queue!r} paused {lasts}: every node stops claiming from it within "
            "its poll interval; running jobs finish. Undo with `jobqctl resume "
            f"{args.queue}`"
        ),
    )
    return EXIT_OK


def cmd_resume(ctx: Context, args: argparse.Namespace) -> int:
    queues.resume(ctx.conn, ctx.schema, args.queue)
    ctx.emit(
        {"queue": args.queue, "paused": False},
        lambda: f"queue {args.queue!r} resumed: workers claim from it again",
    )
    return EXIT_OK


def cmd_enqueue(ctx: Context, args: argparse.Namespace) -> int:
    try:
        job_id = jobs.enqueue(
            ctx.conn,
            ctx.schema,
            args.task,
            args.args,
            queue=args.queue,
            delay=args.delay,
            run_at=args.run_at,
            priority=args.priority,
            max_attempts=args.max_attempts,
            dedup_key=args.dedup_key,
            idempotency_key=args.idempotency_key,
        )
    except (TypeError, PayloadError) as exc:
        _usage(str(exc))
    job = jobs.get(ctx.conn, ctx.schema, job_id)
    queue = job.queue if job is not None else args.queue
    ctx.emit(
        {"id": job_id, "queue": queue, "task": args.task},
        lambda: (
            str(job_id) if args.quiet else f"enqueued job {job_id} ({args.task} on queue {queue!r})"
        ),
    )
    return EXIT_OK


def cmd_wait(ctx: Context, args: argparse.Namespace) -> int:
    """Until every job given has ended (succeeded, dead or cancelled): a script's way to
    wait for work it enqueued. Exit 0 once they have, whatever their state."""
    ids = list(dict.fromkeys(args.ids))
    started = time.monotonic()
    next_note = started + WAIT_NOTE_EVERY
    while True:
        states = jobs.states(ctx.conn, ctx.schema, ids)
        missing = [str(i) for i in ids if i not in states]
        if missing:
            _not_found(
                f"no job {', '.join(missing)}: check the id with `jobqctl jobs` "
                "(it may have been pruned)"
            )
        waiting = [i for i in ids if states[i] in admin.CANCELLABLE_STATES]
        if not waiting:
            break
        now = time.monotonic()
        pending = ", ".join(f"{i} ({states[i]})" for i in waiting)
        if now - started >= args.timeout:
            raise CtlError(
                EXIT_FAILURE,
                f"job {pending} had not ended after {format_duration(args.timeout)}: "
                "pass a longer --timeout, or look at it with `jobqctl show ID`",
            )
        if now >= next_note:
            ctx.note(f"jobqctl: waiting for job {pending}")
            next_note = now + WAIT_NOTE_EVERY
        time.sleep(min(WAIT_POLL, max(0.0, started + args.timeout - now)))
    ctx.emit(
        {"states": {str(i): states[i] for i in ids}},
        lambda: "\n".join(f"job {i}: {states[i]}" for i in ids),
    )
    return EXIT_OK


def _bundle_document(info: bundles.BundleInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "total": info.total,
        "succeeded": info.succeeded,
        "dead": info.dead,
        "cancelled": info.cancelled,
        "ended": info.ended,
        "done": info.done,
        "callback_task": info.callback_task,
        "callback_queue": info.callback_queue,
        "callback_job_id": info.callback_job_id,
        "created_at": info.created_at,
        "finished_at": info.finished_at,
    }


def cmd_bundles(ctx: Context, args: argparse.Namespace) -> int:
    found = [
        _bundle_document(b)
        for b in bundles.newest(ctx.conn, ctx.schema, unfinished=args.unfinished, limit=args.limit)
    ]

    def human() -> str:
        if not found:
            return "no bundles match"
        rows = [
            (
                b["id"],
                b["name"] or "",
                f"{b['ended']}/{b['total']}",
                b["succeeded"],
                b["dead"],
                b["cancelled"],
                output.when(b["finished_at"]) if b["done"] else "waiting",
                b["callback_job_id"] or "",
            )
            for b in found
        ]
        headers = ("ID", "NAME", "ENDED", "OK", "DEAD", "CANCELLED", "FINISHED", "CALLBACK JOB")
        return output.table(headers, rows, right=(0,))

    ctx.emit(found, human)
    return EXIT_OK if found else EXIT_FAILURE


def cmd_bundle(ctx: Context, args: argparse.Namespace) -> int:
    info = bundles.get(ctx.conn, ctx.schema, args.id)
    if info is None:
        _not_found(
            f"no bundle {args.id}: check the id with `jobqctl bundles` (finished bundles are "
            "pruned after retention.succeeded)"
        )
    document = {**_bundle_document(info), "jobs": bundles.members(ctx.conn, ctx.schema, args.id)}

    def human() -> str:
        callback = info.callback_task or "none"
        if info.callback_task:
            callback += f" on queue {info.callback_queue!r}"
            if info.callback_job_id:
                callback += f", job {info.callback_job_id}"
        pairs = [
            ("id", info.id),
            ("name", info.name),
            ("jobs ended", f"{info.ended} of {info.total}"),
            ("succeeded", info.succeeded),
            ("dead", info.dead),
            ("cancelled", info.cancelled),
            ("callback", callback),
            ("created at", info.created_at),
            ("finished at", info.finished_at or "not yet"),
            (
                "jobs now",
                ", ".join(f"{n} {state}" for state, n in document["jobs"].items()) or "none",
            ),
        ]
        return output.fields(pairs)

    ctx.emit(document, human)
    return EXIT_OK


def cmd_migrate(ctx: Context, args: argparse.Namespace) -> int:
    from jobqd.store import migrate as migrations
    from jobqd.store.locks import lock_key

    holder = admin.lock_holder(ctx.conn, ctx.schema, lock_key(ctx.schema, "migrate"))
    if holder is not None:
        ctx.note(f"waiting for another migration to finish (database backend {holder})…")
    done = migrations.migrate(ctx.conn, ctx.schema, dry_run=args.dry_run)
    names = [f"{m.version:04d}_{m.name}" for m in done]

    def human() -> str:
        if not names:
            return f"schema {ctx.schema!r} is up to date: nothing to apply"
        verb = "would apply" if args.dry_run else "applied"
        return "\n".join(f"{verb} {name}" for name in names)

    ctx.emit({"schema": ctx.schema, "dry_run": args.dry_run, "migrations": names}, human)
    return EXIT_OK


def cmd_events(ctx: Context, args: argparse.Namespace) -> int:
    from jobqd import events

    if args.action in ("on", "off"):
        if not args.queues:
            _usage(f"events {args.action} needs one or more queue names")
        for queue in args.queues:
            events.set_events(ctx.conn, ctx.schema, queue, args.action == "on")
    elif args.queues:
        _usage("give `events on QUEUE...` or `events off QUEUE...`; `events` alone lists")
    enabled = events.enabled_queues(ctx.conn, ctx.schema)
    channel = events.channel(ctx.schema)

    def human() -> str:
        which = ", ".join(enabled) if enabled else "none"
        return f"job end events on channel {channel!r} for queues: {which}"

    ctx.emit({"channel": channel, "queues": enabled}, human)
    return EXIT_OK


def cmd_cron(ctx: Context, args: argparse.Namespace) -> int:
    from jobqd.maintenance import cron

    settings = ctx.needs_settings(f"cron {args.action}")
    if args.action == "run":
        if not args.name:
            _usage("cron run needs the entry's name: jobqctl cron run NAME")
        try:
            job_id = cron.fire_now(ctx.conn, settings, args.name)
        except LookupError as exc:
            _not_found(str(exc))
        ctx.emit(
            {"name": args.name, "id": job_id},
            lambda: f"cron entry {args.name!r} enqueued as job {job_id}",
        )
        return EXIT_OK
    entries = cron.cron_status(ctx.conn, settings)

    def human() -> str:
        if not entries:
            return f"no cron entries in {settings.source}"
        rows = [
            (
                e["name"],
                e["schedule"] + ("" if e["timezone"] == "UTC" else f" {e['timezone']}"),
                e["task"],
                e["queue"],
                output.when(e["last_tick"]),
                output.when(e["next_tick"]) if e["enabled"] else "disabled",
            )
            for e in entries
        ]
        headers = ("NAME", "SCHEDULE", "TASK", "QUEUE", "LAST TICK", "NEXT TICK")
        return output.table(headers, rows)

    ctx.emit(entries, human)
    return EXIT_OK


def cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    from jobqd.maintenance.pruner import prune

    settings = ctx.settings or config_module.Settings.default()
    if ctx.settings is None:
        ctx.note("no config file given: pruning with the default retention (-c FILE to use yours)")
    ctx.note("pruning finished jobs past retention…")
    deleted = prune(ctx.conn, settings)

    def human() -> str:
        total = sum(deleted.values())
        if not total:
            return "nothing to prune"
        return "pruned " + ", ".join(f"{n} {kind}" for kind, n in deleted.items() if n)

    ctx.emit(deleted, human)
    return EXIT_OK


def cmd_dashboard(ctx: Context, args: argparse.Namespace) -> int:
    from jobqd.config.settings import DashboardAuthSettings
    from jobqd.http import dashboard as web
    from jobqd.http.dashboard import standalone
    from jobqd.http.server import Sessions

    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        _usage(f"--listen takes HOST:PORT like 127.0.0.1:8080, got {args.listen!r}")
    if args.token_env:
        auth = DashboardAuthSettings(token_env=args.token_env)
    else:
        auth = ctx.settings.http.dashboard_auth if ctx.settings else None
    admin.processes(ctx.conn, ctx.schema)  # unreachable or unmigrated: say so now, not later
    sessions = Sessions(ctx.dsn, application_name="jobqctl")
    try:
        dashboard = web.build(ctx.schema, ctx.settings, sessions.session, auth)
    except JobqdError as exc:
        raise CtlError(EXIT_FAILURE, str(exc)) from None
    if dashboard.auth.missing:
        _usage(f"{dashboard.auth.missing} is not set: export it first, or leave out the auth")
    if not dashboard.auth.required and host not in ("127.0.0.1", "::1", "localhost"):
        ctx.note(
            f"warning: anyone who reaches {host} can read every job's args and errors "
            "(no sign-in); pass --token-env VAR to require one"
        )
    try:
        server = standalone.make_server(dashboard, host, int(port))
    except OSError as exc:
        raise CtlError(
            EXIT_FAILURE,
            f"cannot listen on {args.listen}: {exc.strerror or exc}; pick another --listen",
        ) from None
    mode = dashboard.auth.describe()
    actions = logging.StreamHandler(ctx.err)  # who retried, cancelled or paused what
    actions.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("jobqd.http.dashboard").addHandler(actions)
    logging.getLogger("jobqd.http.dashboard").setLevel(logging.INFO)
    try:
        standalone.serve(server, lambda url: ctx.note(f"dashboard on {url} ({mode}); Ctrl-C stops"))
    except KeyboardInterrupt:
        ctx.note("dashboard stopped")
    finally:
        sessions.close()
    return EXIT_OK


def cmd_dsn(ctx: Context, args: argparse.Namespace) -> int:
    url = db.as_url(ctx.dsn, password=args.show_password)
    has_password = bool(db.password_of(ctx.dsn))
    if has_password and not args.show_password:
        ctx.note("jobqctl: the password is left out; pass --show-password to print it")
    ctx.emit(
        {
            "url": url,
            "schema": ctx.schema,
            "from": ctx.origin,
            "password": ("shown" if args.show_password else "left out") if has_password else None,
        },
        lambda: url,
    )
    return EXIT_OK


def _psql_program() -> str:
    """psql on PATH, else the one pgserver ships (the embedded extra), else a usage error."""
    found = shutil.which("psql")
    if found:
        return found
    spec = importlib.util.find_spec("pgserver")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "pginstall" / "bin" / "psql"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise CtlError(
        EXIT_FAILURE,
        "psql is not installed: install the PostgreSQL client (Debian and Ubuntu: apt install "
        "postgresql-client; Fedora: dnf install postgresql; macOS: brew install libpq), or "
        "point any client at the URL `jobqctl dsn` prints",
    )


def cmd_psql(ctx: Context, args: argparse.Namespace) -> NoReturn:
    program = _psql_program()
    extra = args.psql_args[1:] if args.psql_args[:1] == ["--"] else args.psql_args
    env = dict(os.environ)
    password = db.password_of(ctx.dsn)
    if password:  # in the environment, where other users cannot read it (ps shows argv)
        env["PGPASSWORD"] = password
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, ["psql", db.as_url(ctx.dsn, password=False), *extra], env)
    except OSError as exc:
        raise CtlError(EXIT_FAILURE, f"cannot run {program}: {exc.strerror or exc}") from None


def cmd_roll(ctx: Context, args: argparse.Namespace) -> int:
    """Roll new task code through the workers of this host's masters (jobqd.cli.roll)."""
    grace = ctx.settings.reaper.process_grace if ctx.settings else admin.DEFAULT_STALE_AFTER
    listed = admin.processes(ctx.conn, ctx.schema, stale_after=grace)
    ctx.close()  # nothing more to ask the database while the roll runs
    try:
        outcomes = rolling.roll_host(listed, timeout=args.timeout, note=ctx.note)
    except rolling.RollFailed as exc:
        raise CtlError(EXIT_FAILURE, str(exc)) from None

    def human() -> str:
        return "\n".join(
            f"{o.host} master {o.master_pid}: roll {o.roll} done: {o.replaced} worker(s) "
            f"replaced in {o.seconds:.1f}s"
            for o in outcomes
        )

    ctx.emit({"masters": [o.document() for o in outcomes]}, human)
    return EXIT_OK


# -- the command line ------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options valid before and after the command (`jobqctl --json status`, `status --json`)."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("-c", "--config", metavar="FILE", default=default, help="jobqd config file")
    parser.add_argument("--dsn", metavar="URL", default=default, help="PostgreSQL URL")
    parser.add_argument("--schema", default=default, help="schema name (default: jobqd)")
    flag: Any = argparse.SUPPRESS if suppress else False
    parser.add_argument("--json", action="store_true", default=flag, help="print one JSON document")
    parser.add_argument(
        "--wait",
        type=_duration,
        metavar="DURATION",
        default=default,
        help=f"keep trying to reach the database this long (default {DEFAULT_WAIT:g}s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line; jobqd.cli.manual renders jobqctl(1) from it."""
    parser = argparse.ArgumentParser(
        prog="jobqctl",
        description="Look at jobqd's queues and act on them.",
        epilog="The database comes from -c FILE, --dsn URL, JOBQD_DATABASE_URL or "
        f"{SYSTEM_CONFIG}, in that order.",
    )
    _common(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"jobqctl {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    _common(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[..., int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = command("status", cmd_status, "queues, counts, processes and the leader")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=_duration, default=WATCH_INTERVAL, help="refresh interval")
    command("workers", cmd_workers, "the registered processes on every host")
    p = command("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--queue", help="only jobs of this queue")
    p.add_argument("--state", choices=admin.STATES, help="only jobs in this state")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most this many (50)")
    p = command("show", cmd_show, "one job: args, state, attempts, lease, errors")
    p.add_argument("id", type=_job_id, help="the job id")
    for name, handler, states, help in (
        ("retry", cmd_retry, admin.RETRYABLE_STATES, "run jobs again now"),
        ("cancel", cmd_cancel, admin.CANCELLABLE_STATES, "cancel queued or running jobs"),
    ):
        p = command(name, handler, help)
        p.add_argument("ids", nargs="*", type=_job_id, metavar="ID", help="job ids")
        p.add_argument("--queue", help="every job of this queue in --state")
        p.add_argument("--state", choices=states, help="with --queue: the jobs in this state")
        p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p = command("delete", cmd_delete, "delete jobs that are not running")
    p.add_argument("ids", nargs="+", type=_job_id, metavar="ID", help="job ids")
    p = command("pause", cmd_pause, "stop claiming from a queue on every node")
    p.add_argument("queue", help="the queue to pause")
    p.add_argument(
        "--for",
        dest="duration",
        type=_positive_duration,
        metavar="DURATION",
        help="resume by itself after this long, e.g. 10m, 2h",
    )
    p.add_argument("--by", help="who pauses, shown by status (default: user@host)")
    p.add_argument("--force", action="store_true", help="pause a queue the cluster does not know")
    p = command("resume", cmd_resume, "claim from a paused queue again")
    p.add_argument("queue", help="the queue to resume")
    p = command("enqueue", cmd_enqueue, "enqueue one job")
    p.add_argument("task", help="the task name")
    p.add_argument("--queue", help="default: the task's queue, else default")
    p.add_argument("--args", type=_json_args, default=None, help="job args as JSON")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--delay", type=_duration, help="run after this long, e.g. 30s, 5m")
    when.add_argument("--run-at", type=_time, help="run at this ISO 8601 time")
    p.add_argument("--priority", type=int, default=0, help="smaller runs first")
    p.add_argument("--max-attempts", type=_positive_int, help="default: the task's or queue's")
    p.add_argument(
        "--dedup-key", help="a queued or running job of the queue with this key is returned instead"
    )
    p.add_argument("--idempotency-key", help="enqueue once per key within retention.idempotency")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the job's id")
    p = command("wait", cmd_wait, "wait until jobs have ended; print their states")
    p.add_argument("ids", nargs="+", type=_job_id, metavar="ID", help="job ids")
    p.add_argument(
        "--timeout", type=_duration, default=60.0, help="give up after this long (default 1m)"
    )
    p = command("bundles", cmd_bundles, "list bundles, newest first")
    p.add_argument("--unfinished", action="store_true", help="only bundles still waiting")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most this many (50)")
    p = command("bundle", cmd_bundle, "one bundle: `bundle show ID`")
    p.add_argument("action", choices=("show",), help="show")
    p.add_argument("id", type=_positive_whole_number("a bundle id"), help="the bundle id")
    p = command("migrate", cmd_migrate, "apply pending schema migrations")
    p.add_argument("--dry-run", action="store_true", help="only list what would be applied")
    p = command("events", cmd_events, "list, or turn on/off, job end events per queue")
    p.add_argument(
        "action", nargs="?", choices=("list", "on", "off"), default="list", help="default: list"
    )
    p.add_argument("queues", nargs="*", metavar="QUEUE", help="the queues to turn on or off")
    p = command("cron", cmd_cron, "list cron entries, or run one now")
    p.add_argument("action", choices=("list", "run"), help="list the entries, or run one now")
    p.add_argument("name", nargs="?", help="with run: the cron entry")
    command("prune", cmd_prune, "delete finished jobs past retention now")
    p = command("dashboard", cmd_dashboard, "serve the web dashboard for this database")
    p.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="default 127.0.0.1:8080"
    )
    p.add_argument(
        "--token-env",
        metavar="VAR",
        help="require sign-in with the token in this environment variable, which also "
        "allows actions (default: the config's http.dashboard_auth, else read-only)",
    )
    p = command("dsn", cmd_dsn, "print the database's URL, for psql and other clients")
    p.add_argument(
        "--show-password",
        action="store_true",
        help="include the password the URL came with (left out by default)",
    )
    p = command("psql", cmd_psql, "open psql on the database (arguments after -- go to psql)")
    p.add_argument(
        "psql_args",
        nargs=argparse.REMAINDER,
        metavar="-- PSQL-ARGUMENTS",
        help="passed to psql as they are",
    )
    p = command("roll", cmd_roll, "replace every worker on this host's daemons with new code")
    p.add_argument(
        "--timeout",
        type=_duration,
        default=ROLL_TIMEOUT,
        metavar="DURATION",
        help=f"give up waiting for a daemon's roll after this long (default {ROLL_TIMEOUT:g}s)",
    )
    return parser


@contextmanager
def _failures(ctx_dsn: str) -> Iterator[None]:
    """Database failures as exit codes with a next step."""
    try:
        yield
    except DatabaseUnavailable as exc:
        raise CtlError(EXIT_UNREACHABLE, str(exc)) from None
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as exc:
        raise CtlError(
            EXIT_FAILURE,
            f"the jobqd schema is missing or older than this jobqctl ({first_line(exc)}): "
            "run `jobqctl migrate`",
        ) from None
    except psycopg.errors.InvalidSchemaName as exc:
        raise CtlError(
            EXIT_FAILURE, f"{first_line(exc)}: run `jobqctl migrate` to create it"
        ) from None
    except psycopg.OperationalError as exc:
        raise CtlError(EXIT_UNREACHABLE, db.describe_failure(ctx_dsn, exc)) from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise CtlError(
            EXIT_FAILURE,
            f"{first_line(exc)}: connect as the jobqd daemon role or the schema owner",
        ) from None
    except psycopg.Error as exc:
        raise CtlError(EXIT_FAILURE, f"the database refused: {first_line(exc)}") from None
    except JobqdError as exc:
        raise CtlError(EXIT_FAILURE, str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = None
    try:
        target = resolve(args, os.environ)
        ctx = Context(
            dsn=target.dsn,
            schema=target.schema,
            settings=target.settings,
            origin=target.origin,
            json=bool(args.json),
            yes=bool(getattr(args, "yes", False)),
            wait=DEFAULT_WAIT if args.wait is None else args.wait,
            out=sys.stdout,
            err=sys.stderr,
        )
        with _failures(target.dsn):
            return args.handler(ctx, args)
    except CtlError as exc:
        sys.stdout.flush()
        sys.stderr.write(f"jobqctl: {exc}\n")
        return exc.code
    except DatabaseUnavailable as exc:
        sys.stderr.write(f"jobqctl: {exc}\n")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        sys.stderr.write("jobqctl: interrupted\n")
        return 130
    except BrokenPipeError:  # `jobqctl ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if ctx is not None:
            ctx.close()


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

"""The configuration reference: one text per setting, beside (not inside) settings.py.

`TEXT` maps each dotted key (`*` for a queue, task or cron entry's name) to what it means and
why one would change it. Types and defaults are not written here: `settings()` reads them from
the dataclasses of jobqd.config.settings, so jobqd.yaml(5) and docs/configuration.md, both
rendered from this module by jobqd.cli.manual, cannot disagree with the code. A key with no
text, or a text for a key that does not exist, fails the drift test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass
from typing import Any

from jobqd.config import settings as schema
from jobqd.config.durations import format_duration

TEXT: dict[str, str] = {
    "version": "The format of this file; lets a later jobqd change the format safely.",
    "database": "Where the jobs live. `database: URL` is short for `database: {url: URL}`.",
    "database.url": "A libpq URL (`postgresql://user@host:5432/app?sslmode=require`), or "
    "`embedded`: a private PostgreSQL started by jobqd (pip install 'jobqd[embedded]'). Write "
    "`${JOBQD_DATABASE_URL}` rather than a password; a file that holds one must not be "
    "readable by other users (`jobqd --check` warns). The database's encoding should be UTF8; "
    "SQL_ASCII is refused.",
    "database.schema": "The schema that holds jobqd's tables and SQL functions; one "
    "PostgreSQL database can host several jobqd clusters, one schema each.",
    "database.data_dir": "The embedded PostgreSQL's files (embedded only). Unset: "
    "`$STATE_DIRECTORY/pgdata` under systemd, `/var/lib/jobqd/pgdata` as root, else "
    "`$XDG_DATA_HOME/jobqd/pgdata` (`~/.local/share/jobqd/pgdata`).",
    "database.migrate": "Apply pending migrations when the daemon starts; false if you run "
    "`jobqctl migrate` yourself (as `--no-migrate` does).",
    "database.statement_timeout": "No statement of the daemon may run (and hold locks) longer "
    "than this.",
    "database.application_name": "The prefix of each session's name in pg_stat_activity.",
    "imports": "Modules whose `@task` functions register, e.g. `[myapp.tasks]`; `jobqd --check` "
    "imports them.",
    "pythonpath": "Directories where `imports:` are looked for first, before the working "
    "directory, the config file's directory and the installed packages; a relative one is "
    "taken from the config file's directory.",
    "shutdown_timeout": "On SIGTERM, running jobs get this long to finish; the rest are "
    "released to their queues. Stop timeouts around the daemon (systemd's TimeoutStopSec, "
    "Kubernetes' terminationGracePeriodSeconds, `docker stop -t`) must exceed it by a few "
    "seconds.",
    "child_timeout": "Every child reports to the master each second; one silent this long is "
    "hung (a deadlock, a stuck C call) and is killed and replaced. Must be longer than "
    "database.statement_timeout.",
    "unknown_task_window": "A job whose task a worker does not know (a rolling deploy that has "
    "not reached its node yet) is released unspent, for a node that knows it; unhandled this "
    "long (the leader's setting counts), it ends dead. Make it longer than your slowest "
    "deploy.",
    "log": "Where and how much the daemon logs; everything goes to standard error.",
    "log.format": "`auto`: text on a terminal, JSON lines otherwise (journald, collectors).",
    "log.level": "The least severe level logged.",
    "queues": "The queues this node serves, by name. Leaving `queues` out means one queue, "
    "`default`, with the settings below.",
    "queues.*.processes": "Worker processes on this node; 0 runs none here (the queue still "
    "exists for other nodes).",
    "queues.*.concurrency": "Jobs at once in each worker process (threads).",
    "queues.*.lease": "A claim is valid this long unless renewed; when it lapses the reaper "
    "releases the job for another attempt.",
    "queues.*.heartbeat": "How often a worker renews its leases. Unset: lease / 3; the lease "
    "must be at least 3 heartbeats.",
    "queues.*.poll_interval": "How often an idle worker looks for due jobs; NOTIFY usually "
    "wakes it sooner.",
    "queues.*.max_attempts": "Attempts before a failing job is dead; a task may set its own.",
    "queues.*.backoff": "The delay before a failed job's next attempt.",
    "queues.*.backoff.kind": "`exponential`: base * 2^(attempt-1); `fixed`: always base.",
    "queues.*.backoff.base": "The first delay (exponential) or every delay (fixed).",
    "queues.*.backoff.cap": "No delay is longer than this; at least base.",
    "queues.*.backoff.jitter": "Spread each delay by up to this fraction, so that retries do "
    "not stampede.",
    "queues.*.timeout": "A soft time limit per job: the job sees itself cancelled. Unset: none.",
    "queues.*.grace": "After timeout + grace the worker process is replaced (the hard limit); "
    "also how long a command task's process group has between SIGTERM and SIGKILL.",
    "queues.*.delivery": "`at_most_once`: a job whose worker died is marked dead, never run "
    "again; `at_least_once`: it is released for another attempt.",
    "queues.*.max_jobs_per_process": "Replace a worker process after this many jobs (for "
    "leaky task code). Unset: never.",
    "queues.*.max_memory": "Replace a worker process whose RSS grows above this size, e.g. "
    "`512MiB`. Unset: never.",
    "queues.*.completion_batch": "Outcomes written per complete statement.",
    "queues.*.completion_interval": "The longest an outcome waits for its batch to fill.",
    "queues.*.events": "Job end events on the jobqd_events channel. Unset: whatever "
    "`jobqctl events on|off QUEUE` set.",
    "queues.*.log_jobs": "Log each job's start and end (outcome, duration) at info instead of "
    "debug. Retries, snoozes and deaths are logged either way; args never are. Checked once "
    "per batch, so off costs nothing.",
    "queues.*.retention": "Per-queue overrides of the top-level retention.",
    "queues.*.retention.succeeded": "Unset: the top-level retention.succeeded.",
    "queues.*.retention.dead": "Unset: the top-level retention.dead.",
    "queues.*.aging": "Raise the priority of long-waiting jobs, e.g. `{after: 5m, every: 1m, "
    "step: 1, floor: -100}`. Unset: no aging.",
    "queues.*.aging.after": "Jobs queued longer than this start to move forward.",
    "queues.*.aging.every": "How often they move.",
    "queues.*.aging.step": "How far each move lowers the priority number (a smaller number "
    "runs first).",
    "queues.*.aging.floor": "Aging never lowers a priority below this.",
    "tasks": "Programs run as jobs, by task name. The program gets the job as JSON on stdin, "
    "and JOBQD_JOB_ID, JOBQD_ATTEMPT, JOBQD_MAX_ATTEMPTS, JOBQD_QUEUE and JOBQD_TASK in its "
    "environment. Exit 0: succeeded; 75 (EX_TEMPFAIL): retry later; 65 (EX_DATAERR): discard, "
    "dead now; anything else: failed, retried. It runs in its own process group, which gets "
    "SIGTERM when the job is cancelled or times out or the worker stops, and SIGKILL the "
    "queue's grace later.",
    "tasks.*.command": "The program and its arguments; `{name}` in an argument is replaced "
    "by the job arg `name`.",
    "tasks.*.env": "Variables added to the daemon's environment; values are strings.",
    "tasks.*.cwd": "The working directory. Unset: the daemon's.",
    "tasks.*.timeout": "SIGTERM after this long. Unset: the queue's timeout.",
    "tasks.*.queue": "Jobs of this task enqueued without a queue go here; one of `queues`.",
    "tasks.*.max_attempts": "Unset: the queue's max_attempts.",
    "cron": "Scheduled jobs, by entry name; each tick is enqueued once across all nodes, by "
    "the leader.",
    "cron.*.schedule": "5 fields (minute hour day month weekday), 6 (seconds first), or "
    "@hourly, @daily, @weekly, @monthly, @yearly.",
    "cron.*.task": "A `@task` name or a `tasks:` name.",
    "cron.*.timezone": "The IANA zone the schedule is read in, e.g. Europe/Berlin.",
    "cron.*.queue": "The queue the job goes to; one of `queues`.",
    "cron.*.args": "The job's args.",
    "cron.*.priority": "A smaller number runs first.",
    "cron.*.enabled": "false keeps the entry (and its place in `jobqctl cron list`) idle.",
    "cron.*.misfire": "Ticks missed while no leader ran: `skip` them, run `once` to catch up, "
    "or run `all` of them.",
    "cron.*.misfire_window": "How far back `all` catches up.",
    "retention": "How long finished jobs stay before the pruner deletes them.",
    "retention.succeeded": "Succeeded jobs, and cancelled ones.",
    "retention.dead": "Dead jobs: long enough to inspect them and `jobqctl retry` them.",
    "retention.idempotency": "How long an idempotency_key returns its first job, even once "
    "that job was pruned.",
    "reaper": "The leader's reaper: releases jobs whose lease lapsed, and the jobs of dead "
    "processes.",
    "reaper.interval": "How often the reaper runs.",
    "reaper.process_grace": "A process without a heartbeat this long is dead.",
    "reaper.batch": "Rows per reaper statement, so that no statement runs long.",
    "maintenance": "The maintenance child's leader election and tick.",
    "maintenance.interval": "The leader's tick: cron, reaper, pruner, aging.",
    "maintenance.standby_retry": "How often a standby tries to become leader; a graceful "
    "release wakes standbys at once.",
    "maintenance.leader_timeout": "The server ends a leader's session silent this long (frozen, "
    "cut off), freeing the lock for a standby: the bound on how long a lost leader can stay "
    "leader. At least twice interval and standby_retry. Cron ticks missed meanwhile still "
    "fire.",
    "http": "The http child: /metrics, /healthz, /readyz and the JSON API.",
    "http.listen": '"host:port", e.g. 127.0.0.1:9187. Unset: no HTTP server.',
    "http.token_env": "The environment variable of one more admin token (every scope), so a "
    "setup from before scopes keeps every right it had.",
    "http.tokens": "Bearer tokens by scope: `worker` (claim, heartbeat, finish, queue depth), "
    "`enqueue` (POST /jobs only), `admin` (everything), each the name of an environment "
    "variable holding the token, or a list of names. The YAML never holds a token; values are "
    "read when the http child starts, so a new value takes a restart.",
    "http.max_claim": "The most jobs one POST /queues/{queue}/claim may ask for with `max`; "
    "more is a 400 naming this setting.",
    "http.max_wait": "The longest `wait` a claim may long-poll; keep it below your proxies' "
    "idle timeout.",
    "http.max_waiters": "Claims that may long-poll at once in the http child; one more gets "
    "503 with Retry-After: 1 (claims without `wait` are still served).",
    "http.max_body": "The largest request body accepted.",
    "http.dashboard": "Serve the web dashboard at /dashboard/ on http.listen (which it needs), "
    "beside /metrics: queues, jobs, errors, processes, cron, bundles, and actions once sign-in "
    "is configured. Needs the dashboard extra (pip install 'jobqd[dashboard]'); without it "
    "/dashboard/ answers 503 saying so.",
    "http.dashboard_auth": "Sign-in for the dashboard. Unset: the dashboard is read-only for "
    "anyone who reaches the listener (keep it on 127.0.0.1). Set: every page needs a sign-in, "
    "and signed-in viewers may retry, cancel, delete, pause and run cron entries (POST with a "
    "CSRF token). Give token_env, or user_env and password_env.",
    "http.dashboard_auth.token_env": "The environment variable holding the dashboard token: "
    "given in the sign-in form (a session cookie for 12 hours) or as `Authorization: Bearer`. "
    "Unset in the environment: the dashboard answers 503 rather than open up.",
    "http.dashboard_auth.user_env": "The environment variable holding the basic-auth user "
    "name (with password_env; the browser asks for both).",
    "http.dashboard_auth.password_env": "The environment variable holding the basic-auth "
    "password (with user_env).",
    "database_health": "When `jobqctl status` and /metrics warn that vacuum is held back.",
    "database_health.holder_age": "A transaction or snapshot open this long keeps dead jobs "
    "in the table.",
    "database_health.holder_xid_age": "Or this many transactions behind, where its start time "
    "is hidden (another role's session without pg_read_all_stats, a replication slot).",
    "database_health.dead_tuples": "Dead tuples in one of jobqd's tables (pg_stat_user_tables).",
}

DEFAULT_TEXT: dict[str, str] = {
    "database.url": "$JOBQD_DATABASE_URL, else embedded",
    "database.data_dir": "computed, see the text",
    "queues": "{default: {}}",
}
"""Defaults computed when the file is read (from the environment, the user), said in words."""


@dataclass(frozen=True)
class Setting:
    """One key of the file as the reference shows it."""

    key: str  # dotted, `*` for an entry name
    kind: str  # what the file may hold there
    default: str | None  # None: required (or a section, which has no value of its own)
    text: str
    section: bool


class UndocumentedSetting(LookupError):
    """A setting without a text in TEXT (or of a kind the reference cannot describe)."""


def _cells(read: Callable[..., Any]) -> dict[str, Any]:
    names = read.__code__.co_freevars
    return dict(zip(names, (cell.cell_contents for cell in read.__closure__ or ()), strict=True))


def _kind(key: str, read: Callable[..., Any], nullable: bool) -> str:
    maker = read.__qualname__.split(".")[0]
    simple = {
        "_duration": "duration",
        "_size": "size",
        "_fraction": "number from 0 to 1",
        "_boolean": "boolean",
        "_string": "string",
        "_matching": "string",
        "_listen": '"host:port"',
        "_timezone": "time zone name",
        "_schedule": "cron expression",
        "_modules": "list of module names",
        "_directories": "list of directories",
        "_command": "list of strings",
        "_environment": "mapping of names to strings",
        "_args": "mapping (JSON values)",
        "_tokens": "mapping of scopes to environment variable names",
    }
    if maker == "_choice":
        kind = "one of " + ", ".join(_cells(read)["options"])
    elif maker == "_integer":
        cells = _cells(read)
        low, high = cells["low"], cells["high"]
        kind = "integer" if low is None else f"integer, at least {low}"
        if low is not None and high is not None:
            kind = "integer" if high - low > 10**6 else f"integer from {low} to {high}"
            kind = f"the integer {low}" if low == high else kind
    elif maker in simple:
        kind = simple[maker]
    else:
        raise UndocumentedSetting(f"{key}: its reader {maker} is not described in reference.py")
    return f"{kind}, or null" if nullable else kind


def _size(value: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


def _default(key: str, field: dataclasses.Field[Any], read: Callable[..., Any]) -> str | None:
    if key in DEFAULT_TEXT:
        return DEFAULT_TEXT[key]
    if field.default is MISSING and field.default_factory is MISSING:
        return None
    value = field.default if field.default is not MISSING else field.default_factory()
    maker = read.__qualname__.split(".")[0]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if maker == "_duration":
        return format_duration(value)
    if maker == "_size":
        return _size(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(dict(value))
    return str(value)


def _walk(cls: type, prefix: str) -> Iterator[tuple[str, dataclasses.Field[Any], bool]]:
    """(dotted key, field, is a section) for every key of `cls`, depth first."""
    for field in dataclasses.fields(cls):
        if not field.metadata:
            continue
        key = f"{prefix}{field.name}"
        meta = field.metadata
        if "section" in meta:
            yield key, field, True
            yield from _walk(meta["section"], key + ".")
        elif "entries" in meta:
            yield key, field, True
            yield from _walk(meta["entries"], key + ".*.")
        else:
            yield key, field, False


def dotted_keys() -> list[str]:
    """Every dotted key the settings code reads."""
    return [key for key, _, _ in _walk(schema.Settings, "")]


def settings() -> list[Setting]:
    """Every key with its kind, default and text; UndocumentedSetting if one has no text."""
    result = []
    for key, field, section in _walk(schema.Settings, ""):
        if key not in TEXT:
            raise UndocumentedSetting(f"{key}: no text in jobqd/config/reference.py TEXT")
        if section:
            entries = "entries" in field.metadata
            kind = "mapping of names to sections" if entries else "section"
            default = DEFAULT_TEXT.get(key, "null" if field.default is None else None)
            if entries and default is None:
                default = "{}"
            result.append(Setting(key, kind, default, TEXT[key], True))
            continue
        read = field.metadata["read"]
        nullable = "None" in str(field.type)
        kind = _kind(key, read, nullable)
        result.append(Setting(key, kind, _default(key, field, read), TEXT[key], False))
    return result

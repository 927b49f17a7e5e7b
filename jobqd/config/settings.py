"""Settings: the YAML config file, validated into frozen dataclasses.

Every problem in a file is reported at once, one per line, as `FILE:LINE: key.path: message`,
so a single `jobqd --check` shows everything to fix. Each config key is a dataclass field whose
metadata says how to read it; the field default is the documented default, and a key given as
`null` means that default. Durations are seconds (floats), sizes are bytes (ints), mappings are
`FrozenDict`s, so settings are immutable, hashable and comparable: a reload diffs old and new
queue settings with `==`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from jobqd.config import yamlload
from jobqd.config.durations import format_duration, parse_duration, parse_size
from jobqd.errors import JobqdError
from jobqd.store.connections import EMBEDDED
from jobqd.store.embedded import default_data_dir

DEFAULT_QUEUE = "default"
NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LISTEN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})")


class ConfigError(JobqdError):
    """The configuration is not usable; `errors` lists every problem, one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class InvalidSetting(ValueError):
    """Raised by a settings constructor when fields contradict each other; `key` is to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class FrozenDict(dict[Any, Any]):
    """A dict that refuses changes and hashes by content: immutable, comparable, JSON-ready."""

    __slots__ = ()

    def _immutable(self, *args: object, **kwargs: object) -> None:
        raise TypeError(f"{type(self).__name__} is immutable")

    __setitem__ = __delitem__ = __ior__ = _immutable  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _immutable  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[type, tuple[dict[Any, Any]]]:
        return type(self), (dict(self),)

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


# Readers: one config value in, the setting out, ValueError with a message otherwise.


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return str(value)


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[object], str]:
    def read(value: object) -> str:
        if not pattern.fullmatch(_string(value)):
            raise ValueError(f"expected {what}, got {_show(value)}")
        return str(value)

    return read


def _choice(*options: str) -> Callable[[object], str]:
    def read(value: object) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {_show(value)}")
        return str(value)

    return read


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _integer(low: int | None = None, high: int | None = None) -> Callable[[object], int]:
    def read(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_show(value)}")
        if low is not None and high is not None and not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        if low is not None and value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return read


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {_show(value)}")
    return float(value)


def _duration(least: float = 0.0, *, positive: bool = False) -> Callable[[object], float]:
    def read(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected a duration like 500ms, 30s, 5m, 1h, 1d, got {_show(value)}")
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be longer than 0s, got {_show(value)}")
        if seconds < least:
            raise ValueError(f"must be at least {format_duration(least)}, got {_show(value)}")
        return seconds

    return read


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a size like 512KiB, 1MiB, 1GB, got {_show(value)}")
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"must be more than 0 bytes, got {_show(value)}")
    return size


def _modules(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of module names, got {_show(value)}")
    return tuple(_matching(_MODULE, "a dotted module name like myapp.tasks")(v) for v in value)


def _directories(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of directories, got {_show(value)}")
    for item in value:
        if not _string(item):
            raise ValueError("a directory must not be empty (write . for the config's own)")
    return tuple(value)


def _command(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of program arguments, got {_show(value)}")
    for item in value:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(_string(item))]
        except ValueError as exc:
            raise ValueError(f"bad placeholder in {_show(item)}: {exc}") from None
        for name in names:
            if name is not None and not _PLACEHOLDER.fullmatch(name):
                raise ValueError(f"placeholder {{{name}}} in {_show(item)} must name a job arg")
    return tuple(value)


def _environment(value: object) -> FrozenDict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of names to strings, got {_show(value)}")
    for name, text in value.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"expected environment variable names, got {_show(name)}")
        if not isinstance(text, str):
            raise ValueError(f"{name}: expected a string (quote numbers), got {_show(text)}")
    return FrozenDict(value)


def _json(value: object) -> Any:
    """Deep-frozen copy of JSON-compatible data (mappings become FrozenDicts, lists tuples)."""
    if isinstance(value, dict):
        return FrozenDict({key: _json(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_json(item) for item in value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected JSON values, got {value}")
    if value is None or isinstance(value, str | int | float):
        return value
    raise ValueError(f"expected JSON values, got {type(value).__name__} {value}")


def _args(value: object) -> FrozenDict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of job args, got {_show(value)}")
    return _json(value)


def _schedule(value: object) -> str:
    text = _string(value).strip()
    fields = text.split()
    if not text.startswith("@") and len(fields) not in (5, 6):
        raise ValueError(
            f"expected a cron expression of 5 fields (or 6, seconds first), got {_show(value)}"
        )
    if not croniter.is_valid(text, second_at_beginning=len(fields) == 6):
        raise ValueError(f"invalid cron expression {_show(value)}")
    return text


def _timezone(value: object) -> str:
    try:
        ZoneInfo(_string(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {_show(value)}") from None
    return str(value)


def _listen(value: object) -> str:
    match = _LISTEN.fullmatch(_string(value))
    if match is None:
        raise ValueError(f'expected "host:port" like 127.0.0.1:9187, got {_show(value)}')
    if not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {match.group(2)}")
    return str(value)


def _default_url(env: Mapping[str, str]) -> str:
    return env.get("JOBQD_DATABASE_URL") or EMBEDDED


# Fields: a config key is a dataclass field with metadata saying how to read it.


def _key(default: Any, read: Callable[[Any], Any]) -> Any:
    return field(default=default, metadata={"read": read})


def _required(read: Callable[[Any], Any]) -> Any:
    return field(metadata={"read": read})


def _section(cls: type, *, default: Any = MISSING, shorthand: str | None = None) -> Any:
    factory = cls if default is MISSING else MISSING
    meta = {"section": cls, "shorthand": shorthand}
    return field(default=default, default_factory=factory, metadata=meta)  # type: ignore[call-overload]


def _entries(cls: type, default: Callable[[], FrozenDict] = FrozenDict) -> Any:
    return field(default_factory=default, metadata={"entries": cls})


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """Where the jobs live. `database: URL` is short for `database: {url: URL}`."""

    url: str = field(  # a libpq URL, or "embedded": a private Postgres (pgserver)
        default_factory=lambda: _default_url(os.environ),
        metadata={"read": _string, "from_env": _default_url},
    )
    schema: str = _key("jobqd", _matching(_SCHEMA, "a lower-case SQL identifier"))
    data_dir: str = field(  # the embedded Postgres's files
        default_factory=lambda: str(default_data_dir()),
        metadata={"read": _string},
    )
    migrate: bool = _key(True, _boolean)  # apply migrations when the daemon starts
    statement_timeout: float = _key(30.0, _duration(positive=True))
    application_name: str = _key("jobqd", _string)

    @property
    def is_embedded(self) -> bool:
        return self.url == EMBEDDED


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str = _key("auto", _choice("auto", "json", "text"))  # auto: text on a tty, else json
    level: str = _key("info", _choice("debug", "info", "warning", "error"))


@dataclass(frozen=True, slots=True)
class BackoffSettings:
    """Delay before a failed job's next attempt: base * 2**(attempt-1) (or base), capped."""

    kind: str = _key("exponential", _choice("exponential", "fixed"))
    base: float = _key(1.0, _duration())
    cap: float = _key(3600.0, _duration())
    jitter: float = _key(0.1, _fraction)  # spread each delay by up to this fraction

    def __post_init__(self) -> None:
        if self.cap < self.base:
            cap, base = format_duration(self.cap), format_duration(self.base)
            raise InvalidSetting("cap", f"cap {cap} is less than base {base}")


@dataclass(frozen=True, slots=True)
class QueueRetention:
    """Per-queue overrides of the top-level retention; None means the top-level value."""

    succeeded: float | None = _key(None, _duration())
    dead: float | None = _key(None, _duration())


@dataclass(frozen=True, slots=True)
class AgingSettings:
    """Queued jobs waiting longer than `after` move `step` closer to the front (a smaller
    priority number runs first) every `every`, but not below `floor`."""

    after: float = _key(300.0, _duration())
    every: float = _key(60.0, _duration(positive=True))
    step: int = _key(1, _integer(1))
    floor: int = _key(-100, _integer(-(2**31), 2**31 - 1))


@dataclass(frozen=True, slots=True)
class QueueSettings:
    processes: int = _key(1, _integer(0))  # worker processes on this node
    concurrency: int = _key(8, _integer(1, 1000))  # jobs at once per process
    lease: float = _key(30.0, _duration(1.0))  # a claim is valid this long unless renewed
    heartbeat: float | None = _key(None, _duration(positive=True))  # None: lease / 3
    poll_interval: float = _key(1.0, _duration(positive=True))  # NOTIFY is only a hint
    max_attempts: int = _key(20, _integer(1))
    backoff: BackoffSettings = _section(BackoffSettings)
    timeout: float | None = _key(None, _duration(positive=True))  # soft limit per job
    grace: float = _key(10.0, _duration())  # hard limit = timeout + grace
    delivery: str = _key("at_least_once", _choice("at_least_once", "at_most_once"))
    max_jobs_per_process: int | None = _key(None, _integer(1))  # then the process is replaced
    max_memory: int | None = _key(None, _size)  # bytes of RSS, then the process is replaced
    completion_batch: int = _key(100, _integer(1))  # outcomes per complete statement
    completion_interval: float = _key(0.005, _duration())  # longest wait to fill a batch
    events: bool | None = _key(None, _boolean)  # job end events; None: as jobqctl events set
    log_jobs: bool = _key(False, _boolean)  # job start and end lines at info, not debug
    retention: QueueRetention = _section(QueueRetention)
    aging: AgingSettings | None = _section(AgingSettings, default=None)

    def __post_init__(self) -> None:
        if self.heartbeat is None:
            object.__setattr__(self, "heartbeat", self.lease / 3)
        elif self.heartbeat * 3 > self.lease:
            lease, heartbeat = format_duration(self.lease), format_duration(self.heartbeat)
            raise InvalidSetting(
                "heartbeat", f"lease {lease} is shorter than 3 heartbeats of {heartbeat}"
            )


@dataclass(frozen=True, slots=True)
class TaskSettings:
    """A program run as a job; `{name}` in the command is replaced by the job arg `name`."""

    command: tuple[str, ...] = _required(_command)
    env: FrozenDict = _key(FrozenDict(), _environment)  # added to the daemon's environment
    cwd: str | None = _key(None, _string)
    timeout: float | None = _key(None, _duration(positive=True))
    queue: str = _key(DEFAULT_QUEUE, _string)
    max_attempts: int | None = _key(None, _integer(1))  # None: the queue's


@dataclass(frozen=True, slots=True)
class CronSettings:
    schedule: str = _required(_schedule)  # 5 fields, or 6 with seconds first, or @daily etc.
    task: str = _required(_string)
    timezone: str = _key("UTC", _timezone)
    queue: str = _key(DEFAULT_QUEUE, _string)
    args: FrozenDict = _key(FrozenDict(), _args)
    priority: int = _key(0, _integer(-(2**31), 2**31 - 1))
    enabled: bool = _key(True, _boolean)
    misfire: str = _key("skip", _choice("skip", "once", "all"))  # ticks missed while down
    misfire_window: float = _key(3600.0, _duration(positive=True))  # how far back "all" goes

    @property
    def tzinfo(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """How long finished jobs stay in the table before the pruner deletes them."""

    succeeded: float = _key(86400.0, _duration())  # also cancelled jobs
    dead: float = _key(7 * 86400.0, _duration())
    idempotency: float = _key(86400.0, _duration())  # how long dedup keys are remembered


@dataclass(frozen=True, slots=True)
class ReaperSettings:
    interval: float = _key(5.0, _duration(positive=True))
    process_grace: float = _key(30.0, _duration(positive=True))  # silent this long = dead
    batch: int = _key(1000, _integer(1))


@dataclass(frozen=True, slots=True)
class MaintenanceSettings:
    interval: float = _key(1.0, _duration(positive=True))  # the leader's tick
    standby_retry: float = _key(3.0, _duration(positive=True))  # a standby's try for the lock
    # The server ends a lock session silent this long (a frozen or cut-off leader), which
    # frees the lock: the bound on how long a lost leader can keep leadership.
    leader_timeout: float = _key(10.0, _duration(1.0))

    def __post_init__(self) -> None:
        # The lock session of a healthy leader (every tick) or standby (every try) is never
        # idle for half the timeout, so the server ends only sessions that truly went silent.
        slowest = max(self.interval, self.standby_retry)
        if self.leader_timeout < 2 * slowest:
            timeout, cadence = format_duration(self.leader_timeout), format_duration(slowest)
            raise InvalidSetting(
                "leader_timeout",
                f"{timeout} is less than twice interval/standby_retry ({cadence}): healthy "
                "leaders and standbys would be cut off; raise leader_timeout or lower those",
            )


TOKEN_SCOPES = ("worker", "enqueue", "admin")
"""What a bearer token of the http child may do: `worker` claims, renews and finishes jobs and
reads a queue's depth; `enqueue` only enqueues; `admin` may do everything."""


def _tokens(value: object) -> FrozenDict:
    """scope -> the environment variables holding its tokens (a name or a list of names)."""
    if not isinstance(value, dict):
        raise ValueError(
            f"expected a mapping of scopes ({', '.join(TOKEN_SCOPES)}) to environment "
            f"variable names, got {_show(value)}"
        )
    scopes = {}
    for scope, names in value.items():
        if scope not in TOKEN_SCOPES:
            raise ValueError(
                f"unknown scope {_show(scope)}{_suggest(str(scope), TOKEN_SCOPES)}; "
                f"scopes: {', '.join(TOKEN_SCOPES)}"
            )
        listed = names if isinstance(names, list) else [names]
        if not listed:
            raise ValueError(f"{scope}: expected at least one environment variable name")
        for name in listed:
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise ValueError(  # not shown: it may be a token pasted in by mistake
                    f"{scope}: expected the name of an environment variable holding the "
                    "token (letters, digits, _), never the token itself"
                )
        scopes[scope] = tuple(listed)
    return FrozenDict(scopes)


@dataclass(frozen=True, slots=True)
class DashboardAuthSettings:
    """Who may act in the dashboard: a token, or a basic-auth user and password, each read
    from an environment variable (never from the file)."""

    token_env: str | None = _key(None, _matching(_ENV_NAME, "an environment variable"))
    user_env: str | None = _key(None, _matching(_ENV_NAME, "an environment variable"))
    password_env: str | None = _key(None, _matching(_ENV_NAME, "an environment variable"))

    def __post_init__(self) -> None:
        basic = (self.user_env is not None, self.password_env is not None)
        if self.token_env is not None and any(basic):
            raise InvalidSetting(
                "token_env", "give token_env or user_env and password_env, not both"
            )
        if self.token_env is None and not all(basic):
            missing = "password_env" if basic[0] else "user_env"
            raise InvalidSetting(
                missing, "give token_env, or both user_env and password_env (basic auth)"
            )


@dataclass(frozen=True, slots=True)
class HttpSettings:
    listen: str | None = _key(None, _listen)  # "host:port"; None: no HTTP server
    # the environment variable of the admin token (what the one token of old could do)
    token_env: str = _key("JOBQD_HTTP_TOKEN", _matching(_ENV_NAME, "an environment variable"))
    tokens: FrozenDict = _key(FrozenDict(), _tokens)  # scope -> environment variable names
    max_body: int = _key(2**20, _size)
    max_claim: int = _key(100, _integer(1, 1000))  # most jobs one HTTP claim may take
    max_wait: float = _key(30.0, _duration(positive=True))  # longest long-poll of a claim
    max_waiters: int = _key(100, _integer(1, 10_000))  # claims waiting at once, then 503
    dashboard: bool = _key(False, _boolean)  # serve the web dashboard at /dashboard/
    # without it the dashboard is read-only; with it, sign-in is needed to see it at all
    dashboard_auth: DashboardAuthSettings | None = _section(DashboardAuthSettings, default=None)

    def __post_init__(self) -> None:
        if self.dashboard and self.listen is None:
            raise InvalidSetting(
                "dashboard", "the dashboard is served on http.listen: set it, e.g. 127.0.0.1:9187"
            )

    @property
    def host(self) -> str | None:
        return self.listen.rpartition(":")[0].strip("[]") if self.listen else None

    @property
    def port(self) -> int | None:
        return int(self.listen.rpartition(":")[2]) if self.listen else None


@dataclass(frozen=True, slots=True)
class DatabaseHealthSettings:
    """Where `jobqctl status` and /metrics start to warn about vacuum being held back."""

    holder_age: float = _key(300.0, _duration(positive=True))  # a transaction or snapshot open
    holder_xid_age: int = _key(1_000_000, _integer(1))  # transactions behind, when age is hidden
    dead_tuples: int = _key(100_000, _integer(0))  # dead rows in one of jobqd's tables


@dataclass(frozen=True, slots=True)
class Settings:
    version: int = _key(1, _integer(1, 1))
    database: DatabaseSettings = _section(DatabaseSettings, shorthand="url")
    imports: tuple[str, ...] = _key((), _modules)  # modules whose @task functions register
    # where imports are looked for first; relative to the config file's directory
    pythonpath: tuple[str, ...] = _key((), _directories)
    shutdown_timeout: float = _key(30.0, _duration())  # drain: how long running jobs may finish
    child_timeout: float = _key(120.0, _duration(5.0))  # a child silent this long is killed
    # a job whose task no worker knows is released until then, then the leader ends it dead
    unknown_task_window: float = _key(3600.0, _duration(1.0))
    log: LogSettings = _section(LogSettings)
    queues: FrozenDict = _entries(
        QueueSettings, lambda: FrozenDict({DEFAULT_QUEUE: QueueSettings()})
    )
    tasks: FrozenDict = _entries(TaskSettings)
    cron: FrozenDict = _entries(CronSettings)
    retention: RetentionSettings = _section(RetentionSettings)
    reaper: ReaperSettings = _section(ReaperSettings)
    maintenance: MaintenanceSettings = _section(MaintenanceSettings)
    http: HttpSettings = _section(HttpSettings)
    database_health: DatabaseHealthSettings = _section(DatabaseHealthSettings)
    source: str = field(default="<default>", compare=False)  # the file these came from
    directory: str | None = field(default=None, compare=False)  # the file's, absolute

    def import_path(self) -> tuple[str, ...]:
        """Where `imports:` are looked for before the installed packages, as gunicorn and
        celery do: the `pythonpath:` directories, the working directory, the config file's
        directory. Read when the imports run, in the process that runs them."""
        return tuple(
            dict.fromkeys([*self.pythonpath, os.getcwd(), *filter(None, [self.directory])])
        )

    def __post_init__(self) -> None:
        if self.child_timeout <= self.database.statement_timeout:
            child = format_duration(self.child_timeout)
            statement = format_duration(self.database.statement_timeout)
            raise InvalidSetting(
                "child_timeout",
                f"{child} is not longer than database.statement_timeout {statement}: a child "
                "waiting on a slow statement would be killed as hung; raise child_timeout",
            )

    @classmethod
    def default(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """What an empty config file means: one `default` queue, the embedded database."""
        return parse("", "<default>", env)


# Building: walk the document along the dataclass fields, collecting every problem.


class _Reported(Exception):
    """A problem inside a section, already recorded; the section itself cannot be built."""


class _Context:
    def __init__(self, document: yamlload.Document, env: Mapping[str, str]) -> None:
        self.document = document
        self.env = env
        self.problems: list[tuple[int, str]] = []

    def error(self, path: yamlload.Path, message: str) -> None:
        line = self.document.line(path)
        filename = self.document.filename
        self.problems.append((line, yamlload.format_error(filename, line, path, message)))

    def mapping(self, value: object, path: yamlload.Path) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping, got {_show(value)}")
            raise _Reported
        return value


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _build(ctx: _Context, cls: type, raw: object, path: yamlload.Path) -> Any:
    """An instance of settings class `cls` from `raw`, or _Reported after recording why not."""
    data = ctx.mapping(raw, path)
    keys = {f.name: f for f in dataclasses.fields(cls) if f.metadata}
    for key in data:
        if key not in keys:
            ctx.error((*path, key), "unknown key" + _suggest(key, keys))
    values: dict[str, Any] = {}
    failed = False
    for name, key in keys.items():
        if data.get(name) is None and "section" in key.metadata and key.default is MISSING:
            data = {**data, name: {}}  # built here so its defaults see ctx.env
        has_default = key.default is not MISSING or key.default_factory is not MISSING
        if data.get(name) is None and (name not in data or has_default):
            if not has_default:
                ctx.error(path, f'missing required key "{name}"')
                failed = True
            elif "from_env" in key.metadata:
                values[name] = key.metadata["from_env"](ctx.env)
            continue
        try:
            values[name] = _read(ctx, key.metadata, data[name], (*path, name))
        except _Reported:
            failed = True
        except ValueError as exc:
            ctx.error((*path, name), str(exc))
            failed = True
    if failed:
        raise _Reported
    try:
        return cls(**values)
    except InvalidSetting as exc:
        ctx.error((*path, exc.key), exc.message)
        raise _Reported from None


def _read(ctx: _Context, meta: Mapping[str, Any], value: object, path: yamlload.Path) -> Any:
    if "section" in meta:
        if meta["shorthand"] and isinstance(value, str):
            value = {meta["shorthand"]: value}
        return _build(ctx, meta["section"], value, path)
    if "entries" in meta:
        entries = {}
        for name, entry in ctx.mapping(value, path).items():
            if not NAME.fullmatch(name):
                ctx.error((*path, name), "a name is 1 to 100 letters, digits, or _ . : -")
                continue
            try:
                entries[name] = _build(ctx, meta["entries"], entry, (*path, name))
            except _Reported:
                continue
        return FrozenDict(entries)
    return meta["read"](value)


def _check_queue_references(ctx: _Context, data: object) -> None:
    """Tasks and cron entries must name a configured queue (checked on the raw data so that a
    queue with a bad setting does not also show up as missing)."""
    if not isinstance(data, dict):
        return
    queues = data.get("queues")
    configured = list(queues) if isinstance(queues, dict) else [DEFAULT_QUEUE]
    for section in ("tasks", "cron"):
        entries = data.get(section)
        for name, entry in entries.items() if isinstance(entries, dict) else ():
            queue = entry.get("queue") if isinstance(entry, dict) else None
            queue = DEFAULT_QUEUE if queue is None else queue
            if isinstance(queue, str) and queue not in configured:
                message = f"unknown queue {_show(queue)}{_suggest(queue, configured)}"
                ctx.error((section, name, "queue"), message)


def parse(
    text: str,
    filename: str = "<string>",
    env: Mapping[str, str] = os.environ,
    directory: str | os.PathLike[str] | None = None,
) -> Settings:
    """Settings from YAML `text`; ConfigError lists every problem, each naming `filename`.
    Relative `pythonpath:` entries are taken from `directory` (the config file's), else from
    the working directory."""
    try:
        document = yamlload.load(text, filename, env)
    except yamlload.LoadError as exc:
        raise ConfigError(exc.errors) from None
    ctx = _Context(document, env)
    try:
        settings = _build(ctx, Settings, document.data, ())
    except _Reported:
        settings = None
    _check_queue_references(ctx, document.data)
    if settings is None or ctx.problems:
        raise ConfigError([message for _, message in sorted(ctx.problems, key=lambda p: p[0])])
    base = Path(directory or os.getcwd()).resolve()
    return dataclasses.replace(
        settings,
        source=filename,
        directory=str(base) if directory is not None else None,
        pythonpath=tuple(os.path.normpath(base / entry) for entry in settings.pythonpath),
    )


def load(path: str | os.PathLike[str], env: Mapping[str, str] = os.environ) -> Settings:
    """Settings from the YAML file at `path`; ConfigError if it cannot be read or is invalid."""
    filename = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{filename}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{filename}: not UTF-8 text ({exc.reason} at byte {exc.start})"]
        ) from None
    return parse(text, filename, env, directory=Path(path).resolve().parent)

"""Tasks: the registry of functions that jobs name, the job context they receive, the
exceptions a task raises on purpose, middleware, and command tasks declared in YAML."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jobqd.backoff import Backoff

BackoffPolicy = Backoff | Callable[[int], float]
Middleware = Callable[["Job", Callable[[], Any]], Any]


class Retry(Exception):
    """Fail this attempt and run again after `after` seconds (default: the backoff policy).
    Spends an attempt; out of attempts, the job is dead."""

    def __init__(self, after: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.after = after
        self.reason = reason


class Snooze(Exception):
    """Run again after `delay` seconds without spending an attempt (not ready yet)."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"snoozed for {delay}s")
        self.delay = delay


class Discard(Exception):
    """Give up on this job now: it goes straight to dead with `reason`."""

    def __init__(self, reason: str = "discarded") -> None:
        super().__init__(reason)
        self.reason = reason


class JobCancelled(Exception):
    """Raised by job.check() when the job was cancelled, timed out or lost its lease."""


class Job:
    """What a task function receives: the job's data and a way to notice cancellation.

    Built once per attempt on the hot path, so it is a plain slotted object: args are parsed
    from JSON on first use and timestamps are turned into datetimes only when asked for.
    """

    __slots__ = (
        "_args",
        "_args_json",
        "_cancel_reason",
        "_created",
        "_started",
        "attempt",
        "id",
        "lease_token",
        "max_attempts",
        "queue",
        "started_monotonic",
        "task",
    )

    def __init__(
        self,
        *,
        id: int,
        queue: str,
        task: str,
        args: Any = None,
        attempt: int,
        max_attempts: int,
        lease_token: int = 0,
        args_json: str | None = None,
        created_at: float | datetime | None = None,
        started_at: float | datetime | None = None,
    ) -> None:
        self.id = id
        self.queue = queue
        self.task = task
        self._args = args
        self._args_json = args_json
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.lease_token = lease_token
        self._created = created_at
        self._started = started_at
        self.started_monotonic = time.monotonic()
        self._cancel_reason: str | None = None

    @property
    def args(self) -> Any:
        if self._args_json is not None:
            self._args = json.loads(self._args_json)
            self._args_json = None
        return self._args

    @property
    def created_at(self) -> datetime | None:
        """When the job was enqueued."""
        return _as_datetime(self._created)

    @property
    def started_at(self) -> datetime | None:
        """When this attempt was claimed (database clock)."""
        return _as_datetime(self._started)

    @property
    def cancelled(self) -> bool:
        """True once the job was cancelled, passed its soft timeout, lost its lease, or the
        worker is shutting down past its deadline: cooperative code should stop soon."""
        return self._cancel_reason is not None

    @property
    def cancel_reason(self) -> str:
        return self._cancel_reason or ""

    def cancel(self, reason: str) -> None:
        if self._cancel_reason is None:
            self._cancel_reason = reason

    def check(self) -> None:
        """Raise JobCancelled if the job should stop; call it between units of work."""
        if self._cancel_reason is not None:
            raise JobCancelled(self._cancel_reason)

    def log_fields(self) -> dict[str, Any]:
        return {"job_id": self.id, "queue": self.queue, "task": self.task, "attempt": self.attempt}

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.task} attempt {self.attempt}/{self.max_attempts}>"


def _as_datetime(value: float | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task. None means: use the queue's setting."""

    name: str
    fn: Callable[[Job], Any]
    queue: str = "default"
    max_attempts: int | None = None
    backoff: BackoffPolicy | None = None
    timeout: float | None = None
    delivery: str | None = None
    is_async: bool = field(default=False)


class Registry:
    """Task names to TaskSpecs, with `prefix.*` routes for families of names."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        self._routes: dict[str, TaskSpec] = {}
        self.middleware: list[Middleware] = []

    def add(self, spec: TaskSpec) -> None:
        if spec.name.endswith(".*"):
            self._routes[spec.name[:-1]] = spec
        else:
            self._tasks[spec.name] = spec

    def get(self, name: str) -> TaskSpec | None:
        """The exact task, else the route with the longest matching prefix."""
        spec = self._tasks.get(name)
        if spec is not None:
            return spec
        best = None
        for prefix, route in self._routes.items():
            if name.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, route)
        return best[1] if best else None

    def metric_label(self, name: str) -> str:
        """The task label of a job's metrics: the registered task, or the route that serves
        it (`reports.*`), or UNKNOWN_TASK, so that job names never multiply the series."""
        if name in self._tasks:
            return name
        spec = self.get(name)
        return spec.name if spec is not None else UNKNOWN_TASK

    def names(self) -> list[str]:
        return sorted([*self._tasks, *(p + "*" for p in self._routes)])

    def specs(self) -> list[TaskSpec]:
        return [*self._tasks.values(), *self._routes.values()]

    def clear(self) -> None:
        self._tasks.clear()
        self._routes.clear()
        self.middleware.clear()


registry = Registry()

UNKNOWN_TASK = "(unknown)"
"""The metrics label of every job whose task this process does not know."""


def task(
    name: str,
    *,
    queue: str = "default",
    max_attempts: int | None = None,
    backoff: BackoffPolicy | None = None,
    timeout: float | None = None,
    delivery: str | None = None,
    registry: Registry = registry,
) -> Callable[[Callable[[Job], Any]], Callable[[Job], Any]]:
    """Register `fn(job)` under `name` (or `prefix.*` to serve every name starting so)."""
    if delivery not in (None, "at_least_once", "at_most_once"):
        raise ValueError(f"delivery must be at_least_once or at_most_once, got {delivery!r}")

    def register(fn: Callable[[Job], Any]) -> Callable[[Job], Any]:
        registry.add(
            TaskSpec(
                name=name,
                fn=fn,
                queue=queue,
                max_attempts=max_attempts,
                backoff=backoff,
                timeout=timeout,
                delivery=delivery,
                is_async=inspect.iscoroutinefunction(fn),
            )
        )
        return fn

    return register


def middleware(fn: Middleware, *, registry: Registry = registry) -> Middleware:
    """Wrap every job: `fn(job, call_next)` must call `call_next()` and return its result."""
    registry.middleware.append(fn)
    return fn


def import_modules(modules: Iterable[str]) -> None:
    """Import the config's `imports` so their @task decorators run; errors name the module."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ImportError(f"cannot import {module!r} (from imports:): {exc}") from exc


class CommandFailed(Exception):
    """A command task exited non-zero; the message has the exit status and output tails."""


_TAIL = 4000


def _tail(data: bytes | str | None) -> str:
    if not data:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text[-_TAIL:]


def command_task(name: str, settings: Any) -> TaskSpec:
    """A task that runs a program: argv items are templates filled from the job's args
    (`{user_id}`), exit 0 is success, and the tails of stdout/stderr are kept."""

    def run(job: Job) -> dict[str, Any]:
        values = job.args if isinstance(job.args, Mapping) else {"args": job.args}
        try:
            argv = [part.format_map(values) for part in settings.command]
        except (KeyError, IndexError, ValueError) as exc:
            raise Discard(f"command argv template needs {exc} from the job's args") from exc
        env = {**os.environ, **dict(settings.env)}
        try:
            proc = subprocess.run(
                argv,
                env=env,
                cwd=settings.cwd,
                capture_output=True,
                timeout=settings.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(
                f"{argv[0]} timed out after {settings.timeout}s; stderr: {_tail(exc.stderr)}"
            ) from exc
        except OSError as exc:
            raise CommandFailed(f"cannot run {argv[0]}: {exc}") from exc
        if proc.returncode != 0:
            raise CommandFailed(
                f"{argv[0]} exited with status {proc.returncode}; "
                f"stderr: {_tail(proc.stderr)}; stdout: {_tail(proc.stdout)}"
            )
        return {"exit_code": 0, "stdout": _tail(proc.stdout), "stderr": _tail(proc.stderr)}

    return TaskSpec(
        name=name,
        fn=run,
        queue=settings.queue,
        max_attempts=settings.max_attempts,
        timeout=settings.timeout,
    )


def register_commands(tasks: Mapping[str, Any], registry: Registry = registry) -> None:
    for name, settings in tasks.items():
        registry.add(command_task(name, settings))


class EventLoopThread:
    """One asyncio loop per worker process, on its own thread, for `async def` tasks."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, coro: Any) -> Any:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="jobqd-async", daemon=True).start()
                self._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

"""Tasks: the registry of functions that jobs name, the job context they receive, the
exceptions a task raises on purpose, middleware, and command tasks declared in YAML."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def import_modules(modules: Iterable[str], path: Sequence[str] = ()) -> None:
    """Import the config's `imports` so their @task decorators run, looking in `path` (the
    config's `import_path()`) before the installed packages. An error names the module, and
    for a missing one where it was looked for and what to do."""
    for directory in reversed(path):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise ImportError(_not_found(module, exc, path)) from exc
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise ImportError(
                f"cannot import {module!r} (from imports:): {type(exc).__name__}: {exc} "
                f"(at {where.filename}:{where.lineno})"
            ) from exc


def _not_found(module: str, exc: ModuleNotFoundError, path: Sequence[str]) -> str:
    missing = exc.name or module
    if module != missing and not module.startswith(missing + "."):  # a module it imports
        return (
            f"cannot import {module!r} (from imports:): it imports {missing!r}, which is not "
            f"installed for {sys.executable}: pip install it there"
        )
    top = missing.split(".")[0]
    searched = ", ".join(path) if path else "no directory"
    return (
        f"cannot import {module!r} (from imports:): no module named {missing!r}; looked in "
        f"{searched} and the packages installed for {sys.executable}. Set pythonpath: in the "
        f"config to the directory that holds {top!r}, run jobqd from that directory, or pip "
        "install your project into that Python"
    )


class CommandFailed(Exception):
    """A command task's program failed; the message has its exit status and last stderr line,
    a note (kept in the job's error record, not in log lines) the tails of its output."""


EXIT_RETRY = 75
"""A program's exit status for "retry later": EX_TEMPFAIL in sysexits.h, the code mail
agents and cron wrappers already read as "temporary failure, try again". Spends an attempt."""
EXIT_DISCARD = 65
"""A program's exit status for "discard": EX_DATAERR in sysexits.h, "the input data was
incorrect": the job's args are wrong and no retry can help, so it goes straight to dead."""

_TAIL = 4000
_POLL = 0.05  # how often a waiting slot looks at job.cancelled and its deadlines

# Run by `python -I -S -c` between fork and the program: arms PR_SET_PDEATHSIG (kept across
# exec, except for set-user-ID programs), then execs. preexec_fn would do it in the forked copy
# of a multi-threaded worker, where Python code can deadlock on a lock another thread held at
# fork; a fresh interpreter holds no such lock (it costs about 10 ms per job). The signal fires
# when the parent *thread* exits: run() does not return before the program is reaped, so the
# thread that started it outlives it unless the whole worker dies. The signals a worker ignores
# (INT, HUP, USR2: its master's to coordinate) would stay ignored across exec: the program gets
# their default actions back.
_EXEC_WITH_PARENT_DEATH_SIGNAL = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
    signal.signal(signum, signal.SIG_DFL)
if os.getppid() != int(sys.argv[1]):  # the worker died before the signal was armed
    os._exit(1)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"cannot run {sys.argv[2]}: {exc.strerror}\\n")
    os._exit(127)
"""


def _tail(file: Any) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - _TAIL))
    return file.read().decode(errors="replace")


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""


class _Program:
    """One running program, leader of its own process group (pgid == pid). The group is
    signalled only while the leader is unreaped, so its id cannot belong to anyone else."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.stopped_at: float | None = None  # when it got SIGTERM
        self._lock = threading.Lock()
        self._reaped = False
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # Linux before 5.3: poll with sleeps
            self._pidfd = None

    def signal(self, signum: int) -> None:
        with self._lock:
            if not self._reaped:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signum)

    def stop(self) -> None:
        """SIGTERM to the group, once; the caller sends SIGKILL after its grace."""
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
            self.signal(signal.SIGTERM)

    def exited(self, timeout: float) -> bool:
        """Wait up to `timeout` for the leader to exit, without reaping it."""
        if self._pidfd is not None:
            select.select([self._pidfd], [], [], timeout)
        else:
            time.sleep(timeout)
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self.popen.pid, flags) is not None

    def reap(self) -> int:
        """SIGKILL whatever is left in the group (children the program left behind), then
        collect the leader's exit status."""
        self.signal(signal.SIGKILL)
        with self._lock:
            code = self.popen.wait()
            self._reaped = True
        if self._pidfd is not None:
            os.close(self._pidfd)
        return code


_programs: set[_Program] = set()
_programs_changed = threading.Condition()


def end_programs(grace: float) -> int:
    """Stop every program still running in this process: SIGTERM to each group, SIGKILL
    after `grace`. For a worker about to exit, whose programs must not outlive it. Returns
    how many there were."""
    with _programs_changed:
        programs = list(_programs)
    for program in programs:
        program.stop()
    with _programs_changed:
        _programs_changed.wait_for(lambda: not _programs, timeout=grace)
        left = list(_programs)
    for program in left:
        program.signal(signal.SIGKILL)
    with _programs_changed:
        _programs_changed.wait_for(lambda: not _programs, timeout=1.0)
    return len(programs)


def _job_document(job: Job) -> bytes:
    return json.dumps(
        {
            "id": job.id,
            "queue": job.queue,
            "task": job.task,
            "attempt": job.attempt,
            "max_attempts": job.max_attempts,
            "args": job.args,
        }
    ).encode()


def _job_environment(job: Job) -> dict[str, str]:
    return {
        "JOBQD_JOB_ID": str(job.id),
        "JOBQD_ATTEMPT": str(job.attempt),
        "JOBQD_MAX_ATTEMPTS": str(job.max_attempts),
        "JOBQD_QUEUE": job.queue,
        "JOBQD_TASK": job.task,
    }


def command_task(name: str, settings: Any, *, grace: float) -> TaskSpec:
    """A task that runs a program: argv items are templates filled from the job's args
    (`{user_id}`); the job arrives as JSON on stdin and in JOBQD_* variables; exit 0 is
    success, EXIT_RETRY retry later, EXIT_DISCARD dead now, anything else a failure.

    The program runs in its own process group, which never outlives the job: once the job is
    cancelled (soft timeout, `jobqctl cancel`, a lost lease, the worker stopping) the group
    gets SIGTERM, and SIGKILL `grace` seconds later (the queue's grace); whatever the
    program left in its group is killed when it exits."""

    def run(job: Job) -> dict[str, Any]:
        values = job.args if isinstance(job.args, Mapping) else {"args": job.args}
        try:
            argv = [part.format_map(values) for part in settings.command]
        except (KeyError, IndexError, ValueError) as exc:
            raise Discard(f"command argv template needs {exc} from the job's args") from exc
        env = {**os.environ, **dict(settings.env), **_job_environment(job)}
        with (
            tempfile.TemporaryFile() as stdin,
            tempfile.TemporaryFile() as stdout,
            tempfile.TemporaryFile() as stderr,
        ):
            stdin.write(_job_document(job))
            stdin.seek(0)
            code = _run_program(job, argv, env, settings, grace, stdin, stdout, stderr)
            out, err = _tail(stdout), _tail(stderr)
        if job.cancelled and code != 0:
            raise JobCancelled(
                f"{job.cancel_reason}: {argv[0]} was stopped (SIGTERM, SIGKILL after {grace:g}s)"
            )
        if code == 0:
            return {"exit_code": 0, "stdout": out, "stderr": err}
        detail = _last_line(err)
        if code == EXIT_RETRY:
            raise Retry(reason=f"{argv[0]} exited with status {code} (retry later): {detail}")
        if code == EXIT_DISCARD:
            raise Discard(f"{argv[0]} exited with status {code} (discard): {detail}")
        status = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        failed = CommandFailed(f"{argv[0]} {status}: {detail}")
        failed.add_note(f"stderr: {err}\nstdout: {out}")
        raise failed

    return TaskSpec(
        name=name,
        fn=run,
        queue=settings.queue,
        max_attempts=settings.max_attempts,
        timeout=settings.timeout,
    )


def _run_program(
    job: Job, argv: list[str], env: dict[str, str], settings: Any, grace: float, *files: Any
) -> int:
    """Start the program and wait for it, stopping its group once the job is cancelled or
    past the command's own timeout; returns its exit status (-N: killed by signal N)."""
    stdin, stdout, stderr = files
    job.check()  # cancelled while it waited for a slot
    spawn = [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid())]
    try:
        popen = subprocess.Popen(
            [*spawn, *argv],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=settings.cwd,
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandFailed(f"cannot run {argv[0]}: {exc}") from exc
    program = _Program(popen)
    with _programs_changed:
        _programs.add(program)
    try:
        while not program.exited(_POLL):
            now = time.monotonic()
            if settings.timeout is not None and now - job.started_monotonic >= settings.timeout:
                job.cancel("soft timeout")
            if job.cancelled:
                program.stop()
            if program.stopped_at is not None and now - program.stopped_at >= grace:
                program.signal(signal.SIGKILL)
    finally:
        code = program.reap()
        with _programs_changed:
            _programs.discard(program)
            _programs_changed.notify_all()
    return code


def register_commands(
    tasks: Mapping[str, Any], *, grace: float, registry: Registry = registry
) -> None:
    """Register the config's `tasks:`; `grace` is the time from SIGTERM to SIGKILL."""
    for name, settings in tasks.items():
        registry.add(command_task(name, settings, grace=grace))


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

"""Running one job and deciding what becomes of it: the part of the hot path that the worker
and the testing helpers share, so tests exercise the same decisions production makes."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from jobqd.backoff import Backoff
from jobqd.observe.logs import log_context
from jobqd.tasks import (
    Discard,
    EventLoopThread,
    Job,
    JobCancelled,
    Registry,
    Retry,
    Snooze,
    TaskSpec,
)

log = logging.getLogger("jobqd.execute")

MAX_RESULT_BYTES = 64 * 1024
MAX_TRACEBACK_CHARS = 8000

SUCCEEDED, QUEUED, DEAD = "succeeded", "queued", "dead"
UNHANDLED = "unhandled"
"""Not a job state: the outcome of a job whose task this worker does not know. It is released
(queued, its attempt not spent) for a node that knows the task."""

UNKNOWN_LOG_EVERY = 60.0  # seconds between the log lines about one unknown task name


@dataclass(slots=True)
class Outcome:
    """What to write about one attempt. `delay` is seconds from now for a re-queued job;
    `error` is the JSON error record, or for UNHANDLED the plain message kept as last_error;
    `reason` is why it did not succeed, in words, for its log line."""

    job: Job
    state: str
    delay: float | None = None
    result: str | None = None
    error: str | None = None
    snooze: bool = False
    duration: float = 0.0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """The queue-level defaults a task's own settings override."""

    max_attempts: int = 20
    backoff: Backoff = Backoff()
    timeout: float | None = None
    # A worker releases an unknown task's job for another node; in-process test helpers,
    # where no other node can take it, end it dead at once.
    release_unknown: bool = False


def effective_max_attempts(job_max: int | None, spec: TaskSpec | None, policy: Policy) -> int:
    if job_max is not None:
        return job_max
    if spec is not None and spec.max_attempts is not None:
        return spec.max_attempts
    return policy.max_attempts


def claimed_job(row: tuple[Any, ...], queue: str, registry: Registry, policy: Policy) -> Job:
    """A Job from one row of the `claim` statement, its attempt limit resolved job > task >
    queue policy."""
    job_id, task, args, attempt, max_attempts, token, created, begun, _due = row
    return Job(
        id=job_id,
        queue=queue,
        task=task,
        args_json=args,
        attempt=attempt,
        max_attempts=effective_max_attempts(max_attempts, registry.get(task), policy),
        lease_token=token,
        created_at=created,
        started_at=begun,
    )


def queue_waits(rows: list[tuple[Any, ...]]) -> list[float]:
    """Seconds each claimed job waited between becoming due (`run_at`: its delay, retry or
    snooze included) and its claim (`started_at`), both on the database's clock, for the
    pickup-latency histogram: arithmetic on the claim's columns. Never below zero (a job may
    be due after the claim's transaction began)."""
    return [wait if (wait := row[7] - row[8]) > 0 else 0.0 for row in rows]


def _encode_result(value: Any) -> str | None:
    if value is None:
        return None
    try:
        text = json.dumps(value, default=str, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps(repr(value))
    if len(text) > MAX_RESULT_BYTES:
        return json.dumps({"truncated": True, "preview": text[:1000]})
    return text


def _error_record(job: Job, kind: str, message: str, tb: str | None) -> str:
    return json.dumps(
        {
            "attempt": job.attempt,
            "kind": kind,
            "message": message[:2000],
            "traceback": tb[-MAX_TRACEBACK_CHARS:] if tb else None,
        }
    )


def _retry_or_dead(
    job: Job, kind: str, message: str, tb: str | None, delay: float
) -> tuple[str, float | None, str]:
    record = _error_record(job, kind, message, tb)
    if job.attempt >= job.max_attempts:
        return DEAD, None, record
    return QUEUED, delay, record


def _backoff(spec: TaskSpec | None, policy: Policy, attempt: int) -> float:
    custom = spec.backoff if spec is not None else None
    if custom is None:
        return policy.backoff.delay(attempt)
    if isinstance(custom, Backoff):
        return custom.delay(attempt)
    return float(custom(attempt))


class Executor:
    """Runs jobs through middleware and their task; never raises for a job's own failure."""

    def __init__(self, registry: Registry, policy: Policy) -> None:
        self.registry = registry
        self.policy = policy
        self._loop = EventLoopThread()
        self._unknown = _UnknownTasks()

    def call(self, spec: TaskSpec, job: Job) -> Any:
        def call_task() -> Any:
            if spec.is_async:
                return self._loop.run(spec.fn(job))
            return spec.fn(job)

        chain = call_task
        for wrap in reversed(self.registry.middleware):
            chain = _bind(wrap, job, chain)
        return chain()

    def run(self, job: Job) -> Outcome:
        spec = self.registry.get(job.task)
        with log_context(**job.log_fields()):
            outcome = self._run(spec, job)
        outcome.duration = _elapsed(job)
        return outcome

    def _run(self, spec: TaskSpec | None, job: Job) -> Outcome:
        if spec is None:
            return self._unknown_task(job)
        try:
            result = self.call(spec, job)
        except Snooze as exc:
            return Outcome(job, QUEUED, delay=max(0.0, exc.delay), snooze=True)
        except Discard as exc:
            record = _error_record(job, "Discard", exc.reason, None)
            return Outcome(job, DEAD, error=record, reason=f"discarded: {exc.reason}")
        except Retry as exc:
            delay = exc.after if exc.after is not None else _backoff(spec, self.policy, job.attempt)
            state, delay, record = _retry_or_dead(job, "Retry", exc.reason, None, delay)
            return Outcome(job, state, delay=delay, error=record, reason=exc.reason)
        except JobCancelled as exc:
            reason = str(exc) or "cancelled"
            state, delay, record = _retry_or_dead(
                job, "Cancelled", reason, None, _backoff(spec, self.policy, job.attempt)
            )
            return Outcome(job, state, delay=delay, error=record, reason=f"cancelled: {reason}")
        except Exception as exc:
            tb = traceback.format_exc()
            message = f"{type(exc).__name__}: {exc}"
            state, delay, record = _retry_or_dead(
                job, type(exc).__name__, message, tb, _backoff(spec, self.policy, job.attempt)
            )
            reason = message.splitlines()[0]  # the record keeps all of it
            return Outcome(job, state, delay=delay, error=record, reason=reason)
        return Outcome(job, SUCCEEDED, result=_encode_result(result))

    def _unknown_task(self, job: Job) -> Outcome:
        """A job whose task is not registered here. The name is only looked up in the
        registry, never imported."""
        known = _known(self.registry)
        if not self.policy.release_unknown:
            message = (
                f"unknown task {job.task!r}: no @task with that name is registered "
                f"(known: {known}); check the imports"
            )
            log.error(message, extra=job.log_fields())
            return Outcome(job, DEAD, error=_error_record(job, "UnknownTask", message, None))
        message = (
            f"unknown task {job.task!r}: not registered in this worker (known: {known}); "
            "released for a worker that knows it, without spending an attempt"
        )
        self._unknown.note(job, known)
        return Outcome(job, UNHANDLED, error=message)

    def timed_out(self, job: Job, limit: float) -> Outcome:
        """The outcome of a job that ran past its hard timeout and could not be stopped."""
        message = f"timeout: still running after {limit:.1f}s (soft timeout plus grace)"
        spec = self.registry.get(job.task)
        state, delay, record = _retry_or_dead(
            job, "Timeout", message, None, _backoff(spec, self.policy, job.attempt)
        )
        return Outcome(
            job, state, delay=delay, error=record, duration=_elapsed(job), reason=message
        )


class _UnknownTasks:
    """Log lines about jobs of unknown tasks: one for the first, then at most one every
    UNKNOWN_LOG_EVERY seconds with the count since and a few of the names, not one per job or
    per name (a rolling deploy can hand an old node thousands, of a new route's many names)."""

    SAMPLE = 3  # names quoted in a summary line

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None  # when the last line was written
        self._count = 0  # jobs released since
        self._names: set[str] = set()  # up to SAMPLE of their task names

    def note(self, job: Job, known: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last
            if last is not None and now - last < UNKNOWN_LOG_EVERY:
                self._count += 1
                if len(self._names) < self.SAMPLE:
                    self._names.add(job.task)
                return
            count, names = self._count + 1, sorted({*self._names, job.task})
            self._last, self._count, self._names = now, 0, set()
        if last is None:
            log.warning(
                "unknown task %r: not registered in this worker (known: %s); its jobs are "
                "released for a worker that knows it, without spending an attempt, and end "
                "dead after unknown_task_window; if no node should run it, check the imports",
                job.task,
                known,
                extra=job.log_fields(),
            )
        else:
            log.warning(
                "%d job(s) of unknown tasks released in the last %.0fs (tasks %s)",
                count,
                now - last,
                ", ".join(repr(name) for name in names),
                extra={"queue": job.queue},
            )


def _known(registry: Registry, most: int = 10) -> str:
    """The registered names for a message, the first `most` of them."""
    names = registry.names()
    if not names:
        return "none"
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _bind(wrap: Any, job: Job, call_next: Any) -> Any:
    return lambda: wrap(job, call_next)


def _elapsed(job: Job) -> float:
    return time.monotonic() - job.started_monotonic

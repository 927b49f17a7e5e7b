"""The http child's endpoints for workers in any language and for admins (docs/http-api.md).

A worker token claims (`POST /queues/{queue}/claim`, long-polling with `wait`), renews
(`POST /jobs/{id}/heartbeat`, `POST /jobs/heartbeat` for many) and finishes jobs (`complete`,
`fail`, `snooze`, `discard`) and reads a queue's depth; an admin token also lists jobs, retries
and cancels them and pauses and resumes queues. Every worker call goes through the protocol's
SQL functions (store.protocol), every admin call through the functions jobqctl uses
(store.admin, store.queues), so there is one definition of each. A write fenced by a lease
token that no longer holds is answered 409 and writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import select
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import psycopg

from jobqd.config.durations import parse_duration
from jobqd.config.settings import Settings
from jobqd.errors import first_line
from jobqd.http.auth import ADMIN, WORKER, Tokens
from jobqd.http.errors import ApiError
from jobqd.http.wakeups import TooManyWaiters, Wakeups
from jobqd.store import admin, protocol, queues
from jobqd.store import jobs as job_rows

log = logging.getLogger("jobqd.http")

DEFAULT_LEASE = 30.0
"""A claim's lease when it names none and this daemon does not configure the queue."""
MAX_LEASE = 86_400.0
"""The longest lease a claim or heartbeat may ask for: a vanished worker's job waits this long."""
MAX_HEARTBEAT = 1000
"""Jobs one batched heartbeat may renew."""
MAX_PAGE = 500
"""Jobs one page of GET /jobs may hold."""
_TEXT_LIMIT = 200
_BIGINT = 2**63


@dataclass(frozen=True, slots=True)
class Request:
    """What an endpoint needs of one HTTP request."""

    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    client: str
    body: Callable[[], Any]
    """The JSON body, parsed; {} when there is none."""
    gone: Callable[[], bool]
    """Whether the client hung up (checked while a claim waits)."""


Handler = Callable[["Api", Request, str], tuple[HTTPStatus, Any]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    scope: str
    name: str  # for messages: "POST /queues/{queue}/claim"
    handler: Handler


def disconnected(sock: socket.socket) -> bool:
    """Whether the peer closed `sock`: readable with nothing to read. A pipelined next request
    counts as connected."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Api:
    """The worker and admin endpoints over the child's sessions, tokens and wake-ups."""

    def __init__(self, settings: Settings, sessions: Any, tokens: Tokens, wakeups: Wakeups):
        self.settings = settings
        self.schema = settings.database.schema
        self.http = settings.http
        self.sessions = sessions
        self.tokens = tokens
        self.wakeups = wakeups

    @contextlib.contextmanager
    def _session(self) -> Iterator[psycopg.Connection]:
        """One of the child's sessions. A refusal (an ApiError, a statement the server
        refused) leaves the session fine and idle, so it goes back to the pool instead of
        being closed as a broken one would: a 409 must not cost the next request a connect."""
        refused: Exception | None = None
        with self.sessions.session() as conn:
            try:
                yield conn
            except (ApiError, psycopg.DataError, psycopg.IntegrityError) as exc:
                refused = exc
        if refused is not None:
            raise refused

    def answer(self, request: Request) -> tuple[HTTPStatus, Any] | None:
        """The answer to `request`, or None when no route of this module has its path."""
        allowed = []
        for route in ROUTES:
            match = route.pattern.fullmatch(request.path)
            if match is None:
                continue
            if route.method != request.method:
                allowed.append(route.method)
                continue
            self.tokens.require(request.authorization, route.scope, route.name)
            argument = urllib.parse.unquote(match.group(1)) if match.groups() else ""
            try:
                return route.handler(self, request, argument)
            except psycopg.DataError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, first_line(exc)) from None
        if allowed:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {' or '.join(allowed)} here")
        return None

    # -- worker -------------------------------------------------------------------------------

    def claim(self, request: Request, queue: str) -> tuple[HTTPStatus, Any]:
        body = _object(request.body(), {"max", "lease", "worker", "wait"})
        max_jobs = _integer(body, "max", 1, 1, self.http.max_claim, limit_key="http.max_claim")
        lease = _seconds(body, "lease", self._lease(queue), 1.0, MAX_LEASE)
        wait = _seconds(body, "wait", 0.0, 0.0, self.http.max_wait, limit_key="http.max_wait")
        worker = _text(body, "worker", required=True)

        def once() -> list[dict[str, Any]]:
            with self._session() as conn:
                return protocol.claim(conn, self.schema, queue, max_jobs, lease, worker)

        if wait <= 0:
            return HTTPStatus.OK, {"jobs": once()}
        try:
            jobs = self.wakeups.long_poll(queue, once, wait, request.gone)
        except TooManyWaiters:
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{self.http.max_waiters} claims are waiting already (http.max_waiters): "
                "try again in a second, or claim without 'wait'",
                headers={"Retry-After": "1"},
            ) from None
        return HTTPStatus.OK, {"jobs": jobs}

    def _lease(self, queue: str) -> float:
        configured = self.settings.queues.get(queue)
        return configured.lease if configured is not None else DEFAULT_LEASE

    def heartbeat(self, request: Request, job: str) -> tuple[HTTPStatus, Any]:
        job_id = _job_id(job)
        body = _object(request.body(), {"lease_token", "lease"})
        token = _lease_token(body)
        lease = _seconds(body, "lease", None, 1.0, MAX_LEASE)
        with self._session() as conn:
            rows = protocol.heartbeat(conn, self.schema, [job_id], [token], lease)
            if not rows:
                raise self._lost(conn, job_id, token, "heartbeat")
        return HTTPStatus.OK, rows[0]

    def heartbeat_many(self, request: Request, _: str) -> tuple[HTTPStatus, Any]:
        body = _object(request.body(), {"jobs", "lease"})
        held = body.get("jobs")
        if not isinstance(held, list) or not held:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                '\'jobs\' is required: a list of {"id": ..., "lease_token": ...}',
            )
        if len(held) > MAX_HEARTBEAT:
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"'jobs' holds {len(held)} jobs; one heartbeat renews at most {MAX_HEARTBEAT}",
            )
        ids, tokens = [], []
        for item in held:
            item = _object(item, {"id", "lease_token"}, what="each of 'jobs'")
            ids.append(_job_id(item.get("id")))
            tokens.append(_lease_token(item))
        lease = _seconds(body, "lease", None, 1.0, MAX_LEASE)
        with self._session() as conn:
            rows = protocol.heartbeat(conn, self.schema, ids, tokens, lease)
        renewed = {row["id"] for row in rows}
        return HTTPStatus.OK, {"held": rows, "lost": [i for i in ids if i not in renewed]}

    def complete(self, request: Request, job: str) -> tuple[HTTPStatus, Any]:
        body = _object(request.body(), {"lease_token", "result"})
        return self._outcome(
            "complete",
            job,
            body,
            lambda conn, job_id, token: protocol.complete(
                conn, self.schema, job_id, token, body.get("result")
            ),
        )

    def fail(self, request: Request, job: str) -> tuple[HTTPStatus, Any]:
        body = _object(request.body(), {"lease_token", "error", "retry_in", "kind", "traceback"})
        error = _text(body, "error", required=True, limit=None)
        retry_in = _seconds(body, "retry_in", None, 0.0, None, optional=True)
        kind = _text(body, "kind")
        traceback = _text(body, "traceback", limit=None)
        return self._outcome(
            "fail",
            job,
            body,
            lambda conn, job_id, token: protocol.fail(
                conn,
                self.schema,
                job_id,
                token,
                error,
                retry_in=retry_in,
                kind=kind,
                traceback=traceback,
            ),
        )

    def snooze(self, request: Request, job: str) -> tuple[HTTPStatus, Any]:
        body = _object(request.body(), {"lease_token", "seconds"})
        seconds = _seconds(body, "seconds", None, 0.0, None)
        return self._outcome(
            "snooze",
            job,
            body,
            lambda conn, job_id, token: protocol.snooze(conn, self.schema, job_id, token, seconds),
        )

    def discard(self, request: Request, job: str) -> tuple[HTTPStatus, Any]:
        body = _object(request.body(), {"lease_token", "reason"})
        reason = _text(body, "reason", required=True, limit=None)
        return self._outcome(
            "discard",
            job,
            body,
            lambda conn, job_id, token: protocol.discard(conn, self.schema, job_id, token, reason),
        )

    def _outcome(
        self,
        action: str,
        job: str,
        body: dict[str, Any],
        write: Callable[[psycopg.Connection, int, int], dict[str, Any] | None],
    ) -> tuple[HTTPStatus, Any]:
        job_id = _job_id(job)
        token = _lease_token(body)
        with self._session() as conn:
            row = write(conn, job_id, token)
            if row is None:
                raise self._lost(conn, job_id, token, action)
        return HTTPStatus.OK, row

    def _lost(self, conn: psycopg.Connection, job_id: int, token: int, action: str) -> ApiError:
        """404 when there is no such job, else 409: the lease token no longer holds it."""
        found = job_rows.get(conn, self.schema, job_id)
        if found is None:
            return ApiError(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        fields = {"job_id": job_id, "queue": found.queue, "task": found.task}
        log.info(
            "lease lost: an HTTP worker's %s was refused (the job is %s now)",
            action,
            found.state,
            extra={**fields, "attempt": found.attempt},
        )
        return ApiError(
            HTTPStatus.CONFLICT,
            f"lease lost: job {job_id} is {found.state} (attempt {found.attempt}) and lease "
            f"token {token} no longer holds it; stop working on it, nothing was written",
        )

    def queue(self, request: Request, queue: str) -> tuple[HTTPStatus, Any]:
        with self._session() as conn:
            rows = {row["queue"]: row for row in admin.queue_status(conn, self.schema)}
            pause = queues.paused(conn, self.schema, queue)
        row = rows.get(queue) or {
            **dict.fromkeys(_DEPTH_KEYS, 0),
            "events": False,
            "paused_at": None,
            "oldest_age": None,
        }
        row.update(queue=queue, **pause)  # paused: now (a timed pause that ran out is not)
        return HTTPStatus.OK, row

    # -- admin --------------------------------------------------------------------------------

    def list_jobs(self, request: Request, _: str) -> tuple[HTTPStatus, Any]:
        unknown = sorted(set(request.query) - {"queue", "state", "limit", "before"})
        if unknown:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                f"unknown query parameters {unknown}; allowed: before, limit, queue, state",
            )
        queue = _query(request, "queue")
        state = _query(request, "state")
        if state is not None and state not in admin.STATES:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"state must be one of {', '.join(admin.STATES)}"
            )
        limit = _query_int(request, "limit", 50, 1, MAX_PAGE)
        before = _query_int(request, "before", None, 1, None)
        with self._session() as conn:
            found = admin.jobs(
                conn, self.schema, queue=queue, state=state, limit=limit, before=before
            )
        more = found[-1]["id"] if len(found) == limit else None
        return HTTPStatus.OK, {"jobs": found, "next_before": more}

    def retry(self, request: Request, job: str) -> tuple[HTTPStatus, Any]:
        job_id = _job_id(job)
        _object(request.body(), set())
        with self._session() as conn:
            if not admin.retry(conn, self.schema, [job_id]):
                raise self._refused(conn, job_id, "retried: only dead, cancelled or queued")
        return HTTPStatus.OK, {"id": job_id, "state": "queued"}

    def cancel(self, request: Request, job: str) -> tuple[HTTPStatus, Any]:
        job_id = _job_id(job)
        _object(request.body(), set())
        with self._session() as conn:
            if not admin.cancel(conn, self.schema, [job_id]):
                raise self._refused(conn, job_id, "cancelled: only queued or running")
        return HTTPStatus.OK, {"id": job_id, "state": "cancelled"}

    def _refused(self, conn: psycopg.Connection, job_id: int, what: str) -> ApiError:
        state = job_rows.states(conn, self.schema, [job_id]).get(job_id)
        if state is None:
            return ApiError(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        return ApiError(
            HTTPStatus.CONFLICT, f"job {job_id} is {state} and cannot be {what} jobs can"
        )

    def pause(self, request: Request, queue: str) -> tuple[HTTPStatus, Any]:
        body = _object(request.body(), {"duration", "force"})
        duration = _seconds(body, "duration", None, 0.001, None, optional=True)
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ApiError(HTTPStatus.BAD_REQUEST, "'force' must be true or false")
        with self._session() as conn:
            if not force and not queues.known(conn, self.schema, queue):
                raise ApiError(
                    HTTPStatus.NOT_FOUND,
                    f"no queue {queue!r}: no daemon serves it, no task names it and it has no "
                    'jobs (a typo?); send {"force": true} to pause it anyway',
                )
            with job_rows.clean_errors():
                queues.pause(
                    conn, self.schema, queue, duration=duration, paused_by=f"http {request.client}"
                )
            return HTTPStatus.OK, {"queue": queue, **queues.paused(conn, self.schema, queue)}

    def resume(self, request: Request, queue: str) -> tuple[HTTPStatus, Any]:
        _object(request.body(), set())
        with self._session() as conn:
            queues.resume(conn, self.schema, queue)
            return HTTPStatus.OK, {"queue": queue, **queues.paused(conn, self.schema, queue)}


_DEPTH_KEYS = (
    "queued",
    "scheduled",
    "retrying",
    "running",
    "dead",
    "cancelled",
    "succeeded_1h",
    "per_minute",
)


def _route(method: str, template: str, scope: str, handler: Handler) -> Route:
    """A route for `template`, a path whose `{queue}` or `{id}` matches one path segment."""
    pattern = re.compile(re.sub(r"\{\w+\}", "([^/]+)", template))
    return Route(method, pattern, scope, f"{method} {template}", handler)


ROUTES = (
    _route("POST", "/queues/{queue}/claim", WORKER, Api.claim),
    _route("GET", "/queues/{queue}", WORKER, Api.queue),
    _route("POST", "/queues/{queue}/pause", ADMIN, Api.pause),
    _route("POST", "/queues/{queue}/resume", ADMIN, Api.resume),
    _route("POST", "/jobs/heartbeat", WORKER, Api.heartbeat_many),
    _route("POST", "/jobs/{id}/heartbeat", WORKER, Api.heartbeat),
    _route("POST", "/jobs/{id}/complete", WORKER, Api.complete),
    _route("POST", "/jobs/{id}/fail", WORKER, Api.fail),
    _route("POST", "/jobs/{id}/snooze", WORKER, Api.snooze),
    _route("POST", "/jobs/{id}/discard", WORKER, Api.discard),
    _route("POST", "/jobs/{id}/retry", ADMIN, Api.retry),
    _route("POST", "/jobs/{id}/cancel", ADMIN, Api.cancel),
)
"""The endpoints of this module, by path and method; GET /jobs (the list) is routed beside
POST /jobs in server.py and calls Api.list_jobs."""


# -- reading a request ------------------------------------------------------------------------


def _object(value: Any, keys: set[str], *, what: str = "the body") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} must be a JSON object")
    unknown = sorted(set(value) - keys)
    if unknown:
        allowed = ", ".join(sorted(keys)) or "none"
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown keys {unknown}; allowed: {allowed}")
    return value


def _job_id(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _BIGINT:
        return value
    if isinstance(value, str) and value.isdigit() and 0 < int(value) < _BIGINT:
        return int(value)
    raise ApiError(HTTPStatus.BAD_REQUEST, f"job ids are positive numbers, got {value!r}")


def _lease_token(body: dict[str, Any]) -> int:
    token = body.get("lease_token")
    if isinstance(token, bool) or not isinstance(token, int) or not -_BIGINT < token < _BIGINT:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "'lease_token' is required: the number the claim returned with the job",
        )
    return token


def _integer(
    body: dict[str, Any], key: str, default: int, low: int, high: int, *, limit_key: str
) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' must be an integer")
    if not low <= value <= high:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"'{key}' must be between {low} and {high} ({limit_key})"
        )
    return value


def _seconds(
    body: dict[str, Any],
    key: str,
    default: float | None,
    low: float,
    high: float | None,
    *,
    limit_key: str | None = None,
    optional: bool = False,
) -> Any:
    """Seconds from a number or a duration like `30s`, `5m`; required when `default` is None
    unless `optional` (then None)."""
    value = body.get(key)
    if value is None:
        if default is None and not optional:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"'{key}' is required: seconds, or a duration like 30s"
            )
        return default
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError
        seconds = float(value) if isinstance(value, int | float) else parse_duration(value)
        if not math.isfinite(seconds):
            raise ValueError
    except ValueError:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"'{key}' must be seconds or a duration like 30s, 5m"
        ) from None
    if seconds < low or (high is not None and seconds > high):
        bound = f"at least {low:g}s" if high is None else f"between {low:g}s and {high:g}s"
        where = f" ({limit_key})" if limit_key else ""
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' must be {bound}{where}")
    return seconds


def _text(
    body: dict[str, Any], key: str, *, required: bool = False, limit: int | None = _TEXT_LIMIT
) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' is required: a non-empty string")
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' must be a non-empty string")
    if limit is not None and len(value) > limit:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' is longer than {limit} characters")
    return value


def _query(request: Request, key: str) -> str | None:
    values = request.query.get(key)
    return values[-1] if values else None


def _query_int(
    request: Request, key: str, default: int | None, low: int, high: int | None
) -> int | None:
    text = _query(request, key)
    if text is None:
        return default
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be a number {bound}")
    return int(text)

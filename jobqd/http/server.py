"""The `jobqd: http` child: /metrics, /healthz, /readyz and a small JSON API.

The master cannot serve HTTP itself (it forks at any time, so it runs no threads and holds no
database connection); it feeds this child instead, over `feed_fd`, one JSON object per line:
`metrics` (the node's aggregated counters, a full `MetricStore.snapshot()`) and `health` (the
children and when the master last turned its loop). EOF on the feed means the master is gone.

The master binds `http.listen` itself (a taken address fails the start) and this child serves
on the socket it inherits; it starts before the database is reached and, in a drain, is
stopped only after the last worker has exited. It also writes the node's health (each
child's restarts and crash loops, as the master reports them) into its own jobqd.processes
row every `HEALTH_WRITE_INTERVAL`, which is how `jobqctl status` sees crash loops: the
master has no database connection, and a child that crash-loops may never get a row.
What /metrics exports, and how it reads the database for it, is jobqd.http.metrics.

Endpoints:
  GET /metrics     Prometheus text 0.0.4, or OpenMetrics when the Accept header asks for it
  GET /healthz     200 while the master fed us in the last `HEALTH_WINDOW` seconds, else 503
                   (the database plays no part: the master feeds us while it waits for it)
  GET /readyz      200 when the master has prepared the database, the database answers,
                   migrations are current and every child has booted and none crash-loops;
                   else 503 and which check failed
  POST /jobs       enqueue (enqueue scope), 201 {"id": ...}
  GET /jobs        jobs newest first, filtered, paged by `before` (admin)
  GET /jobs/{id}   one job (admin)
  GET /bundles/{id} one bundle: counts, callback, its jobs per state (admin)
  GET /queues      queue status (admin)
  and the worker and admin endpoints of jobqd.http.api: claim (long-polling with `wait`),
  heartbeat, complete, fail, snooze, discard, a queue's depth; retry, cancel, pause, resume.
The JSON API needs `Authorization: Bearer <token>` with a token of the scope the endpoint
needs (jobqd.http.auth: `http.tokens`, and `http.token_env` for admin); 401 without a known
token, 403 without the scope, 503 when no token is set at all. docs/http-api.md has it all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from jobqd.config.durations import parse_duration
from jobqd.daemon.ipc import Sender, Status
from jobqd.daemon.lifecycle import (
    STATUS_INTERVAL,
    ChildContext,
    ChildProcess,
    ProcessRow,
    Stopping,
)
from jobqd.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    DatabaseUnavailable,
    JobqdError,
    PayloadError,
    first_line,
)
from jobqd.http.api import Api, Request, disconnected
from jobqd.http.auth import ADMIN, ENQUEUE, Tokens
from jobqd.http.errors import ApiError
from jobqd.http.metrics import Scrape
from jobqd.http.wakeups import Wakeups
from jobqd.store import admin, bundles, migrate
from jobqd.store import jobs as job_rows
from jobqd.store.connections import connect
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.http")

HEALTH_WINDOW = 5.0
"""Seconds without a message from the master after which /healthz says 503."""
READY_TTL = 1.0
REQUEST_TIMEOUT = 10.0
"""Seconds a client may take to send its request (slow clients hold a thread)."""
DB_TIMEOUT_MS = 5_000
CONNECT_TIMEOUT = 3
SESSIONS = 16
"""Database sessions kept open between requests: enough for HTTP workers' claims and outcomes
to reuse them (a busier moment opens more, closed afterwards)."""
HEALTH_WRITE_INTERVAL = 2.0
"""Seconds between writes of the node's health into this child's jobqd.processes row."""
_JOB_PATH = re.compile(r"/jobs/([^/]+)")
_BUNDLE_PATH = re.compile(r"/bundles/([^/]+)")


class Feed:
    """The latest of what the master sent, and when it last sent anything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snapshot: dict[str, Any] = {}
        self.health: dict[str, Any] | None = None
        self.fed_at: float | None = None
        self._buffer = b""

    def take(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.fed_at = time.monotonic()
                if message.get("kind") == "metrics" and isinstance(message.get("snapshot"), dict):
                    self.snapshot = message["snapshot"]
                elif message.get("kind") == "health":
                    self.health = message

    def state(self) -> tuple[dict[str, Any], dict[str, Any] | None, float | None]:
        with self._lock:
            return self.snapshot, self.health, self.fed_at


class Sessions:
    """A few database sessions of this child's own. A session that failed is dropped and the
    next request opens a fresh one, so the child recovers as soon as the database is back."""

    def __init__(self, dsn: str, size: int = SESSIONS, *, application_name: str = "jobqd") -> None:
        # A probe must answer before the prober gives up, also when the host is unreachable.
        self.dsn = make_conninfo(dsn, connect_timeout=CONNECT_TIMEOUT)
        self.application_name = f"{application_name} http"
        self.size = size
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def session(self) -> Iterator[psycopg.Connection]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = connect(
                self.dsn,
                application_name=self.application_name,
                statement_timeout_ms=DB_TIMEOUT_MS,
                extra_options={"lock_timeout": str(DB_TIMEOUT_MS)},
            )
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if conn.closed or len(self._idle) >= self.size:
                conn.close()
            else:
                self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Cached:
    """A value recomputed at most every `ttl` seconds, by one thread at a time."""

    def __init__(self, ttl: float, compute: Callable[[], Any]) -> None:
        self.ttl = ttl
        self.compute = compute
        self._lock = threading.Lock()
        self._value: Any = None
        self._at = -float("inf")

    def get(self) -> Any:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                self._value = self.compute()
                self._at = time.monotonic()
            return self._value


class App:
    """What the endpoints answer, apart from HTTP itself (see Handler)."""

    def __init__(
        self,
        settings: Any,
        dsn: str,
        feed: Feed,
        tokens: Tokens,
        *,
        master_pid: int | None = None,
    ) -> None:
        self.settings = settings
        self.schema = settings.database.schema
        self.feed = feed
        self.tokens = tokens
        name = settings.database.application_name
        self.sessions = Sessions(dsn, application_name=name)
        self.wakeups = Wakeups(
            self.sessions.dsn,
            self.schema,
            application_name=name,
            max_waiters=settings.http.max_waiters,
        )
        self.api = Api(settings, self.sessions, tokens, self.wakeups)
        self._database = _Cached(READY_TTL, self._check_database)
        self.scrape = Scrape(settings, self.sessions.session, master_pid=master_pid)

    # -- metrics and health -----------------------------------------------------------------

    def metrics(self, accept: str | None) -> tuple[bytes, str]:
        """The /metrics body and its Content-Type (jobqd.http.metrics)."""
        snapshot, health, _ = self.feed.state()
        return self.scrape.body(snapshot, health, accept)

    def healthz(self) -> tuple[HTTPStatus, dict[str, Any]]:
        _, health, fed_at = self.feed.state()
        if fed_at is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "down", "error": "no word yet"}
        ago = time.monotonic() - fed_at
        body: dict[str, Any] = {"master_fed_seconds_ago": round(ago, 3)}
        if ago > HEALTH_WINDOW:
            body.update(status="down", error=f"the master has been silent for {ago:.0f}s")
            return HTTPStatus.SERVICE_UNAVAILABLE, body
        body["status"] = "ok"
        if health is not None:
            body["master"] = health.get("status")
        return HTTPStatus.OK, body

    def _check_database(self) -> tuple[str | None, str | None]:
        """(database problem, migrations problem); None means fine."""
        try:
            with self.sessions.session() as conn:
                todo = migrate.pending(conn, self.schema)
        except (psycopg.Error, DatabaseUnavailable) as exc:
            return f"unreachable: {first_line(exc)}", "unknown (database unreachable)"
        except migrate.MigrationError as exc:
            return None, first_line(exc)
        if todo:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
            return None, f"pending: {names} (run `jobqctl migrate`)"
        return None, None

    def readyz(self) -> tuple[HTTPStatus, dict[str, Any]]:
        _, health, _ = self.feed.state()
        preparing = (health or {}).get("preparing")
        if preparing:  # the master is still waiting for the database, or migrating it
            checks = {"database": preparing, "migrations": "not yet", "children": "not started"}
            body = {"ready": False, "checks": checks, "error": f"database: {preparing}"}
            return HTTPStatus.SERVICE_UNAVAILABLE, body
        database, migrations = self._database.get()
        checks = {
            "database": database or "ok",
            "migrations": migrations or "ok",
            "children": _children_problem(health) or "ok",
        }
        failed = [name for name, result in checks.items() if result != "ok"]
        body: dict[str, Any] = {"ready": not failed, "checks": checks}
        if failed:
            body["error"] = "; ".join(f"{name}: {checks[name]}" for name in failed)
            return HTTPStatus.SERVICE_UNAVAILABLE, body
        return HTTPStatus.OK, body

    # -- JSON API ---------------------------------------------------------------------------

    def authorize(self, header: str | None, scope: str, what: str) -> None:
        self.tokens.require(header, scope, what)

    def enqueue(self, body: Any) -> dict[str, Any]:
        kwargs = _enqueue_arguments(body)
        task = kwargs.pop("task")
        args = kwargs.pop("args", None)
        try:
            with self.sessions.session() as conn:
                return {"id": job_rows.enqueue(conn, self.schema, task, args, **kwargs)}
        except PayloadError as exc:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, first_line(exc)) from None

    def job(self, text: str) -> dict[str, Any]:
        try:
            job_id = int(text)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"job ids are numbers, got {text!r}") from None
        with self.sessions.session() as conn:
            found = job_rows.get(conn, self.schema, job_id)
        if found is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        return dataclasses.asdict(found)

    def bundle(self, text: str) -> dict[str, Any]:
        try:
            bundle_id = int(text)
        except ValueError:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"bundle ids are numbers, got {text!r}"
            ) from None
        with self.sessions.session() as conn:
            found = bundles.get(conn, self.schema, bundle_id)
            members = bundles.members(conn, self.schema, bundle_id) if found else {}
        if found is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no bundle {bundle_id}")
        return {**dataclasses.asdict(found), "done": found.done, "jobs": members}

    def queues(self) -> dict[str, Any]:
        with self.sessions.session() as conn:
            return {"queues": admin.queue_status(conn, self.schema)}


def _children_problem(health: dict[str, Any] | None) -> str | None:
    if health is None:
        return "no health report from the master yet"
    if health.get("stopping"):
        return "the daemon is stopping"
    looping, down = [], []
    for name, child in sorted((health.get("children") or {}).items()):
        if name == "http" or not isinstance(child, dict):
            continue
        if child.get("crash_looping"):
            looping.append(f"{name} ({child.get('crash_loop')}; last: {child.get('last_exit')})")
        elif not child.get("booted"):
            down.append(name)
    problems = []
    if looping:
        problems.append(f"crash-looping: {', '.join(looping)}")
    if down:
        problems.append(f"not booted: {', '.join(down)}")
    return "; ".join(problems) or None


def node_health(health: dict[str, Any]) -> dict[str, Any]:
    """What this child writes into its jobqd.processes row about the node: the master's
    pid-free view of each child (restarts, crash loop, last exit), what it waits for and its
    last roll (jobqd.daemon.roll)."""
    keys = ("role", "queue", "booted", "restarts", "crash_looping", "crash_loop", "last_exit")
    children = {
        name: {key: child.get(key) for key in keys}
        for name, child in (health.get("children") or {}).items()
        if isinstance(child, dict)
    }
    return {
        "children": children,
        "preparing": health.get("preparing") or None,
        "roll": health.get("roll"),
    }


def _enqueue_arguments(body: Any) -> dict[str, Any]:
    """The keywords for Client.enqueue, checked the way the client checks them."""
    if not isinstance(body, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    unknown = sorted(set(body) - job_rows.ENQUEUE_KEYS)
    if unknown:
        allowed = ", ".join(sorted(job_rows.ENQUEUE_KEYS))
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown keys {unknown}; allowed: {allowed}")
    kwargs = {key: value for key, value in body.items() if value is not None}
    if not isinstance(kwargs.get("task"), str) or not kwargs["task"]:
        raise ApiError(HTTPStatus.BAD_REQUEST, "'task' is required: the task's name")
    for key in ("queue", "dedup_key", "idempotency_key"):
        if key in kwargs and not isinstance(kwargs[key], str):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' must be a string")
    for key in ("priority", "max_attempts"):
        if key in kwargs and (isinstance(kwargs[key], bool) or not isinstance(kwargs[key], int)):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"'{key}' must be an integer")
    if "delay" in kwargs:
        kwargs["delay"] = _delay(kwargs["delay"])
    if "run_at" in kwargs:
        kwargs["run_at"] = _run_at(kwargs["run_at"])
    if "delay" in kwargs and "run_at" in kwargs:
        raise ApiError(HTTPStatus.BAD_REQUEST, "give 'delay' or 'run_at', not both")
    return kwargs


def _delay(value: Any) -> float:
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError
        seconds = parse_duration(value)
    except ValueError:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, "'delay' must be seconds or a duration like 30s, 5m"
        ) from None
    if seconds < 0:
        raise ApiError(HTTPStatus.BAD_REQUEST, "'delay' cannot be negative")
    return seconds


def _run_at(value: Any) -> datetime:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "'run_at' must be an ISO 8601 time with a zone, like 2025-01-31T09:00:00Z",
        )
    return moment


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Handler(BaseHTTPRequestHandler):
    """HTTP for App: routing, size and time caps, JSON errors."""

    app: App  # set on the subclass made by make_server
    dashboard: Any = None  # a jobqd.http.dashboard.Dashboard when http.dashboard is on
    max_body: int
    timeout = REQUEST_TIMEOUT
    # Keep-alive: an HTTP worker's claims and outcomes reuse one connection (every answer
    # has a Content-Length), instead of a TCP handshake and a thread per request.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as written, not 40 ms later
    server_version = "jobqd"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.client_address[0], *args)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(
        self, status: HTTPStatus, document: Any, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(document, default=_json_default, ensure_ascii=False).encode()
        self._send(status, body + b"\n", "application/json", headers)

    def _request(self, method: str, path: str, query: str) -> Request:
        return Request(
            method=method,
            path=path,
            query=urllib.parse.parse_qs(query),
            authorization=self.headers.get("Authorization"),
            client=self.client_address[0],
            body=lambda: self._body(optional=True),
            gone=lambda: disconnected(self.connection),
        )

    def _route(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        auth = self.headers.get("Authorization")
        self._consumed = False
        if self.dashboard is not None and self.dashboard.handles(path):
            if (
                self.headers.get("Content-Length", "0") != "0"
                or "Transfer-Encoding" in self.headers
            ):
                self.close_connection = True  # a form refused unread must not pass for a request
            self.dashboard.serve(self)
            return
        try:
            if method == "GET" and path == "/metrics":
                self._send(HTTPStatus.OK, *self.app.metrics(self.headers.get("Accept")))
            elif method == "GET" and path == "/healthz":
                self._json(*self.app.healthz())
            elif method == "GET" and path == "/readyz":
                self._json(*self.app.readyz())
            elif (answer := self.app.api.answer(self._request(method, path, query))) is not None:
                self._json(*answer)
            elif path == "/jobs" and method == "GET":
                self.app.authorize(auth, ADMIN, "GET /jobs")
                self._json(*self.app.api.list_jobs(self._request(method, path, query), ""))
            elif path == "/jobs":
                self._allow(method, "POST")
                self.app.authorize(auth, ENQUEUE, "POST /jobs")
                self._json(HTTPStatus.CREATED, self.app.enqueue(self._body()))
            elif _JOB_PATH.fullmatch(path):
                self._allow(method, "GET")
                self.app.authorize(auth, ADMIN, "GET /jobs/{id}")
                self._json(HTTPStatus.OK, self.app.job(_JOB_PATH.fullmatch(path).group(1)))
            elif _BUNDLE_PATH.fullmatch(path):
                self._allow(method, "GET")
                self.app.authorize(auth, ADMIN, "GET /bundles/{id}")
                self._json(HTTPStatus.OK, self.app.bundle(_BUNDLE_PATH.fullmatch(path).group(1)))
            elif path == "/queues":
                self._allow(method, "GET")
                self.app.authorize(auth, ADMIN, "GET /queues")
                self._json(HTTPStatus.OK, self.app.queues())
            elif path in ("/metrics", "/healthz", "/readyz"):
                self._allow(method, "GET")
            else:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        except ApiError as exc:
            unread = self.headers.get("Content-Length", "0") != "0" or (
                "Transfer-Encoding" in self.headers
            )
            if unread and not self._consumed:
                self.close_connection = True  # the unread body must not pass for a request
            self._json(exc.status, {"error": str(exc)}, exc.headers)
        except (DatabaseUnavailable, psycopg.OperationalError) as exc:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"database: {first_line(exc)}"})
        except psycopg.Error as exc:
            log.warning("http %s %s failed: %s", method, path, first_line(exc))
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": first_line(exc)})

    def _allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {allowed} here")

    def _body(self, *, optional: bool = False) -> Any:
        """The JSON body; with `optional`, {} when there is none."""
        length = self.headers.get("Content-Length")
        if length is None and optional and "Transfer-Encoding" not in self.headers:
            return {}
        if length is None:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        try:
            size = int(length)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if size > self.max_body:
            self.close_connection = True
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {size} bytes is over http.max_body ({self.max_body} bytes)",
            )
        data = self.rfile.read(size)
        self._consumed = True
        if optional and not data.strip():
            return {}
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}") from None

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a long-poll given up, a worker killed) is routine; anything
        else is logged, never printed to stderr as socketserver would."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("http client %s hung up", client_address[0])
        else:
            log.exception("http request from %s failed", client_address[0])


def make_server(
    settings: Any, app: App, listener: socket.socket | None = None, dashboard: Any = None
) -> ThreadingHTTPServer:
    """A server for `app` (and `dashboard`, if any) on `listener` (the socket the master
    bound), or binding `http.listen` itself (IPv4 or IPv6) when there is none."""
    host, port = settings.http.host, settings.http.port
    attributes = {"app": app, "dashboard": dashboard, "max_body": settings.http.max_body}
    handler = type("BoundHandler", (Handler,), attributes)
    server_class = _Server
    if ":" in (host or ""):
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    if listener is None:
        return server_class((host, port), handler)
    server = server_class((host, port), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    server.server_address = listener.getsockname()[:2]
    server.server_name, server.server_port = str(host), int(server.server_address[1])
    return server


class HttpChild(ChildProcess):
    """The http child's life: serve on threads, follow the master's feed on the main thread
    until it closes (the master is gone), a stop signal or a new parent."""

    role = "http"
    log = log

    def __init__(
        self,
        settings: Any,
        server: ThreadingHTTPServer,
        feed: Feed,
        *,
        sender: Sender | None,
        parent_pid: int | None,
        on_title: Callable[[str], None] | None,
        sessions: Sessions | None = None,
        wakeups: Wakeups | None = None,
    ) -> None:
        row = ProcessRow(queries(settings.database.schema), "http", fields={"child": "http"})
        super().__init__(sender=sender, parent_pid=parent_pid, on_title=on_title, row=row)
        self.settings = settings
        self.server = server
        self.feed = feed
        self.sessions = sessions
        self.wakeups = wakeups
        self._done = threading.Event()

    def metadata(self) -> dict[str, Any]:
        _, health, _ = self.feed.state()
        return node_health(health or {})

    def _write_health(self) -> None:
        """Keep the node's health in this child's jobqd.processes row; while the database
        is away there is nothing to write to, and /readyz says so."""
        while not self._done.wait(HEALTH_WRITE_INTERVAL):
            if self.sessions is None or self.feed.state()[1] is None:
                continue
            try:
                with self.sessions.session() as conn:
                    if self.process_id is None:
                        self.register(conn)
                    else:
                        self.heartbeat(conn)
            except (psycopg.Error, DatabaseUnavailable):
                continue

    def _deregister(self) -> None:
        self._done.set()
        if self.sessions is None or self.process_id is None:
            return
        with (
            contextlib.suppress(psycopg.Error, DatabaseUnavailable),
            self.sessions.session() as conn,
        ):
            self.deregister(conn)

    def run(self, feed_fd: int, tokens: Tokens) -> int:
        thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)
        thread.start()
        writer = threading.Thread(target=self._write_health, name="health", daemon=True)
        writer.start()
        if self.wakeups is not None:
            self.wakeups.start()
        self.on_title(f"http {self.settings.http.listen}")
        log.info(
            "serving /metrics, /healthz, /readyz and the JSON API on %s; token scopes: %s",
            self.settings.http.listen,
            tokens.describe(),
        )
        self.send_booted()
        try:
            self._follow(feed_fd)
        finally:
            if self.wakeups is not None:  # waiting claims answer at once, with no jobs
                self.wakeups.stop()
            self.server.shutdown()
            self.server.server_close()
            self._deregister()
        return EXIT_OK

    def _follow(self, feed_fd: int) -> None:
        next_status = 0.0
        while self.stopping is Stopping.NO:
            if self.wait(0.5, feed_fd):
                chunk = os.read(feed_fd, 65536)
                if not chunk:
                    log.info("the master closed the feed: stopping")
                    return
                self.feed.take(chunk)
            if self.master_gone():
                return
            now = time.monotonic()
            if self.sender is not None and now >= next_status:
                next_status = now + STATUS_INTERVAL
                self.send(Status())


def serve(
    settings: Any,
    dsn: str,
    *,
    feed_fd: int,
    sender: Sender | None = None,
    parent_pid: int | None = None,
    on_title: Callable[[str], None] | None = None,
    listener: socket.socket | None = None,
) -> int:
    """Serve until the feed closes (the master is gone), TERM/QUIT, or the parent changes."""
    feed = Feed()
    tokens = Tokens.from_settings(settings.http)
    app = App(settings, dsn, feed, tokens, master_pid=parent_pid)
    dashboard = None
    if settings.http.dashboard:
        from jobqd.http import dashboard as web

        try:
            dashboard = web.build(
                app.schema, settings, app.sessions.session, settings.http.dashboard_auth
            )
        except JobqdError as exc:
            log.error("cannot serve the dashboard: %s; /dashboard/ answers 503 until then", exc)
            dashboard = web.Unavailable(str(exc))
        else:
            level = logging.WARNING if dashboard.auth.missing else logging.INFO
            log.log(level, "dashboard at /dashboard/, %s", dashboard.auth.describe())
    try:
        server = make_server(settings, app, listener, dashboard)
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.http.listen, exc.strerror or exc)
        return EXIT_FAILURE
    child = HttpChild(
        settings,
        server,
        feed,
        sender=sender,
        parent_pid=parent_pid,
        on_title=on_title,
        sessions=app.sessions,
        wakeups=app.wakeups,
    )
    child.install_signals()
    try:
        return child.run(feed_fd, tokens)
    finally:
        app.sessions.close()


def serve_child(child: ChildContext) -> int:
    """The http role's entry for the master (jobqd.daemon.lifecycle.ROLES)."""
    assert child.feed_fd is not None
    return serve(
        child.settings,
        child.dsn,
        feed_fd=child.feed_fd,
        sender=child.sender,
        parent_pid=child.parent_pid,
        on_title=child.on_title,
        listener=child.listener,
    )

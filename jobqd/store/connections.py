"""Connections: conninfo with the session settings every daemon session carries, and the
database URL a config names (the embedded server's: jobqd.store.embedded).

Every daemon session gets an `application_name` naming its process, a `statement_timeout` and
an `idle_in_transaction_session_timeout` (a stuck session must never hold locks for long), and
TCP keepalives so a dead peer is noticed in seconds rather than hours.

Keepalives and `tcp_user_timeout` cannot see a half-open link whose far end still
acknowledges (a middlebox on a dead path): there only a deadline kept by the client works.
`RoundTripWatchdog` is that deadline, one piece for every session that needs one (the leader
session, the worker's): a round trip that outlives its bound gets its socket shut down, so
the statement fails at once and the caller reconnects.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd.errors import DatabaseUnavailable, first_line
from jobqd.store import embedded

EMBEDDED = "embedded"


def resolve_url(url: str | None, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Turn a configured database URL (or 'embedded'/None) into a real conninfo, starting
    the embedded server (and its keeper) for this process when that is what it names."""
    if not url or url == EMBEDDED:
        return embedded.start(data_dir)
    return url


_SECRETS = (
    # user:password@ in a URL, also a malformed one quoted back by libpq
    (re.compile(r"(?P<keep>[^\s\"'/:@]*:)[^\s\"'@/]*@"), r"\g<keep>***@"),
    # password=... as a conninfo keyword or a URL query parameter
    (re.compile(r"(?P<keep>password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&\"']+)", re.I), r"\g<keep>***"),
)


def redact(text: str) -> str:
    """`text` with every password that a DSN in it carries replaced by ***."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def password_of(dsn: str) -> str | None:
    """The password a DSN carries, if any (for a child's PGPASSWORD, never for printing)."""
    try:
        return conninfo_to_dict(dsn).get("password") or None
    except psycopg.ProgrammingError:
        return None


def as_url(dsn: str, *, password: bool = False) -> str:
    """A `postgresql://` URL that psql and every libpq client accept for `dsn` (a URL or
    key=value conninfo), its password left out unless asked: hosts that are socket
    directories and every other parameter go in the query string."""
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError as exc:
        raise _malformed(exc) from None
    secret = params.pop("password", None)
    user = params.pop("user", None)
    dbname = params.pop("dbname", None)
    netloc = ""
    hosts = params.get("host", "").split(",")
    if "host" in params and not any(h.startswith(("/", "@")) or not h for h in hosts):
        ports = params.pop("port", "").split(",")
        ports += [ports[-1]] * (len(hosts) - len(ports))  # one port for every host
        del params["host"]
        netloc = ",".join(
            (f"[{h}]" if ":" in h else quote(h, safe="")) + (f":{p}" if p else "")
            for h, p in zip(hosts, ports, strict=False)
        )
    if user:
        auth = quote(user, safe="")
        if password and secret:
            auth += ":" + quote(secret, safe="")
        netloc = f"{auth}@{netloc}"
    url = f"postgresql://{netloc}/{quote(dbname, safe='') if dbname else ''}"
    if params:
        url += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in params.items())
    return url


def _malformed(exc: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(
        f"the database URL is malformed: {redact(first_line(exc))} "
        "(fix database.url / --dsn / JOBQD_DATABASE_URL)"
    )


def session_conninfo(
    dsn: str,
    *,
    application_name: str,
    statement_timeout_ms: int | None = 30_000,
    idle_in_transaction_timeout_ms: int = 60_000,
    extra_options: dict[str, str] | None = None,
    connect_timeout: int = 10,
    tcp_user_timeout_ms: int | None = None,
) -> str:
    """The caller's DSN plus jobqd's session settings, without losing options it already has."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise _malformed(exc) from None
    options = [params.pop("options", "")] if params.get("options") else []
    settings = {"idle_in_transaction_session_timeout": str(idle_in_transaction_timeout_ms)}
    if statement_timeout_ms is not None:
        settings["statement_timeout"] = str(statement_timeout_ms)
    settings.update(extra_options or {})
    options += [f"-c {key}={value}" for key, value in settings.items()]
    # psycopg parses json/jsonb as UTF-8 bytes: whatever the database's encoding, the server
    # converts to UTF8 for jobqd's sessions.
    params["client_encoding"] = "UTF8"
    params.setdefault("connect_timeout", str(max(2, connect_timeout)))  # libpq's minimum: 2
    if tcp_user_timeout_ms is not None:  # unacknowledged data fails the link after this
        params.setdefault("tcp_user_timeout", str(tcp_user_timeout_ms))
    params.setdefault("keepalives", "1")
    params.setdefault("keepalives_idle", "10")
    params.setdefault("keepalives_interval", "3")
    params.setdefault("keepalives_count", "3")
    return make_conninfo(
        "", **params, application_name=application_name[:63], options=" ".join(options)
    )


def connect(dsn: str, *, application_name: str, autocommit: bool = True, **kw: object):
    """Open one session with jobqd's settings; errors say where we tried to connect."""
    conninfo = session_conninfo(dsn, application_name=application_name, **kw)  # type: ignore[arg-type]
    try:
        return psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(describe_failure(dsn, exc)) from None
    except psycopg.ProgrammingError as exc:  # a value libpq refuses, e.g. connect_timeout=abc
        raise _malformed(exc) from None


def subscribe(conn: psycopg.Connection, channel: str) -> None:
    """Subscribe `conn` to NOTIFYs on `channel`.

    The one statement built by hand: LISTEN takes an identifier, which cannot be a bound
    parameter, so the channel is quoted as one rather than named in the .sql files."""
    conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))


def unsubscribe(conn: psycopg.Connection, channel: str) -> None:
    """Undo subscribe(): UNLISTEN takes an identifier too."""
    conn.execute(pgsql.SQL("UNLISTEN {}").format(pgsql.Identifier(channel)))


def location(dsn: str) -> str:
    """HOST:PORT/DB of a DSN for messages: never its password, whatever else it holds."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        params = {}
    where = params.get("host") or "localhost"
    if params.get("port"):
        where += f":{params['port']}"
    return f"{where}/{params.get('dbname', '')}"


def describe_failure(dsn: str, exc: BaseException) -> str:
    """Where we tried to connect and the server's reason, with no password in it."""
    if "unsupported startup parameter" in str(exc):
        hint = (
            "a pooler such as pgbouncer refused the 'options' parameter jobqd sends its session "
            "settings in: add `ignore_startup_parameters = options` to pgbouncer.ini (and use "
            "pool_mode = session), or connect to PostgreSQL directly; see docs/pgbouncer.md"
        )
    else:
        hint = "check that the server is running and database.url / --dsn / JOBQD_DATABASE_URL"
    return f"cannot connect to PostgreSQL at {location(dsn)}: {redact(first_line(exc))} ({hint})"


class RoundTripWatchdog:
    """A deadline on every round trip of one session, kept by a thread of its own.

    Wrap each round trip in `busy()`; one that takes longer than `bound` seconds has its
    socket shut down, so libpq fails it at once (psycopg.OperationalError) and the caller
    reconnects. `busy(conn)` watches that connection; `busy()` watches whatever `current()`
    returns when the bound passes (for a round trip that may open its own connection). Close
    a watched connection inside `closing()`: the watchdog never shuts down a socket number
    that a closed connection gave back and another file took.
    """

    def __init__(
        self,
        bound: float,
        current: Callable[[], psycopg.Connection | None] = lambda: None,
        *,
        name: str = "watchdog",
    ) -> None:
        self.bound = bound
        self.tripped = 0  # round trips ended by the watchdog
        self._current = current
        self._name = name
        self._interval = min(0.5, max(0.02, bound / 10))
        self._lock = threading.Lock()
        self._since: float | None = None
        self._conn: psycopg.Connection | None = None
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def busy(self, conn: psycopg.Connection | None = None) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name=self._name, daemon=True)
            self._thread.start()
        with self._lock:
            self._conn, self._since = conn, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._conn = self._since = None

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """Hold while closing a watched connection."""
        with self._lock:
            yield

    def _watch(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                since = self._since
                if since is None or time.monotonic() - since < self.bound:
                    continue
                conn = self._conn or self._current()
                if conn is None or conn.closed:
                    continue
                self._since = None  # once per round trip
                self.tripped += 1  # the caller's error log says why, from this count
                with contextlib.suppress(psycopg.Error):
                    shut_down(conn.pgconn.socket)


def shut_down(fd: int) -> None:
    """Shut a socket down under libpq's feet: its pending and next calls fail at once. The fd
    stays open (libpq closes it), so no other file can take its number meanwhile."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)

"""The leader lock: a session-level advisory lock on a dedicated, direct connection.

Whoever holds the lock is the leader. The session that holds it is also the only one the
leader writes with, so a write can succeed only while the lock is held: if the session is
gone the write fails, and if it exists the lock is still there. The database, not the leader,
bounds how long a lost leader keeps the lock: the lock session carries
`idle_session_timeout` and `tcp_user_timeout` of `maintenance.leader_timeout`, so the server
ends it once it falls silent (a frozen process, whose kernel still answers keepalives, or a
partition) and frees the lock; a healthy leader and standby speak on it every tick or try, far
more often. A frozen leader that resumes finds its session gone at its next statement and
steps down. The old leader also stops trusting its leadership when it has not verified the
lock for its trust window: `TRUST_WINDOW`, or less when `leader_timeout` is shorter, so a
cut-off leader stops acting before the server can have freed its lock for a standby.

A graceful release NOTIFYs the leader channel, which every standby LISTENs to on its lock
session, so a standby tries for the lock at once instead of at its next retry. A statement can also
hang without any TCP error, behind a middlebox that keeps acknowledging while nothing gets
through: a watchdog thread then shuts the session's socket down, so the statement fails and
the leader steps down.

Session advisory locks need a session that stays on one server backend; a pooler that hands
the backend to other clients between transactions (pgbouncer in transaction or statement mode)
breaks that, so it is detected and refused (see docs/pgbouncer.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from jobqd.errors import DatabaseUnavailable, JobqdError
from jobqd.store.connections import RoundTripWatchdog, connect, location, subscribe
from jobqd.store.locks import lock_key, pg_locks_parts
from jobqd.store.sql import queries

log = logging.getLogger("jobqd.leader")

# Server side: Postgres drops a silent client's session, and so frees the lock, after about
# idle + interval * count = 11 s without keepalive answers; idle_session_timeout and
# tcp_user_timeout (LeaderSession.server_options) end it after leader_timeout of silence.
SERVER_OPTIONS = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "jit": "off",  # short statements only: compiling them costs more than it saves
}
LEADER_TIMEOUT = 10.0
# Client side: a statement waiting on a dead server fails after about 7 s.
CLIENT_PARAMS = {
    "keepalives": "1",
    "keepalives_idle": "3",
    "keepalives_interval": "2",
    "keepalives_count": "2",
    "tcp_user_timeout": "6000",
}
# A leader that has not verified its lock for this long stops acting as leader, and no round
# of statements on the session may take longer: shorter than the server's 10-11 s, so a
# partitioned leader has stopped before anyone else can start.
TRUST_WINDOW = 8.0
LOCK_STATEMENT_TIMEOUT = 10.0
_IDLE_IN_TRANSACTION_MS = 60_000


class LeadershipLost(JobqdError):
    """The lock is no longer (provably) held: step down."""


class PoolerDetected(JobqdError):
    """The connection goes through a pooler that multiplexes sessions: no leader lock."""


def pooler_message(dsn: str, evidence: str) -> str:
    return (
        f"the leader lock needs a direct session to PostgreSQL, but {location(dsn)} {evidence}: "
        "this "
        "looks like a connection pooler such as pgbouncer in transaction or statement mode, "
        "where a session advisory lock stays on a server connection that other clients then "
        "use. Point database.url at PostgreSQL itself or at a pgbouncer pool with "
        "pool_mode = session (see docs/pgbouncer.md)"
    )


def ensure_direct(dsn: str, *, application_name: str) -> None:
    """Refuse a DSN whose sessions do not keep their own backend.

    Two client sessions never share a backend when connected directly (or through a pooler in
    session mode). A transaction-mode pooler gives the backend one client just released to the
    next client, and gives a client another backend while its previous one is busy, so one of
    the two comparisons below differs.
    """
    try:
        with (
            connect(dsn, application_name=application_name) as first,
            connect(dsn, application_name=application_name) as second,
        ):
            before = _backend_pid(first)
            with second.transaction():
                other = _backend_pid(second)
                after = _backend_pid(first)
    except DatabaseUnavailable as exc:
        if "unsupported startup parameter" in str(exc):
            raise PoolerDetected(
                f"cannot connect through {location(dsn)}: it refused the 'options' startup "
                "parameter that jobqd sends with every session, as pgbouncer does. Connect "
                "jobqd to PostgreSQL directly, or through a pgbouncer pool with pool_mode = "
                "session and ignore_startup_parameters = options (see docs/pgbouncer.md)"
            ) from exc
        raise
    if other == before or after != before:
        raise PoolerDetected(pooler_message(dsn, "moved sessions between server backends"))


def _backend_pid(conn: psycopg.Connection) -> int:
    row = conn.execute(queries().leader_backend_pid).fetchone()
    assert row is not None
    return int(row[0])


def release_channel(schema: str) -> str:
    """The channel a graceful release notifies and standbys listen on."""
    return f"{schema}.leader"


def current_leader(conn: psycopg.Connection, schema: str) -> dict[str, Any] | None:
    """The maintenance process holding the leader lock now (host, pid, ...), or None.

    Read from the lock itself (pg_locks), so a stale `processes` row cannot claim to lead.
    """
    key = lock_key(schema, "leader")
    cur = conn.execute(queries(schema).leader_current, pg_locks_parts(key))
    row = cur.fetchone()
    if row is None:
        return None
    names = [column.name for column in cur.description or ()]
    return dict(zip(names, row, strict=True))


class LeaderSession:
    """The dedicated session that tries for, holds and proves the leader lock."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        application_name: str,
        statement_timeout: float = LOCK_STATEMENT_TIMEOUT,
        leader_timeout: float = LEADER_TIMEOUT,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.application_name = application_name
        self.statement_timeout = min(statement_timeout, LOCK_STATEMENT_TIMEOUT)
        self.sql = queries(schema)
        self.key = lock_key(schema, "leader")
        self._key_parts = pg_locks_parts(self.key)
        silence_ms = str(int(leader_timeout * 1000))
        self.server_options = {
            **SERVER_OPTIONS,
            "idle_session_timeout": silence_ms,
            "tcp_user_timeout": silence_ms,
        }
        self.channel = release_channel(schema)
        self.released = False  # a release was notified since the last try
        self.conn: psycopg.Connection | None = None
        self.backend_pid: int | None = None
        self.held = False
        self.verified_at = float("-inf")
        self.trust_window = min(TRUST_WINDOW, 0.8 * leader_timeout)
        self._watchdog = RoundTripWatchdog(self.trust_window, lambda: self.conn, name="watchdog")
        self._warned_options = False

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def open(self) -> psycopg.Connection:
        """Connect if not connected; the connection carries the keepalive settings."""
        if self.conn is not None and not self.conn.closed:
            return self.conn
        self.close()
        conninfo = make_conninfo(self.dsn, **CLIENT_PARAMS)
        conn = connect(
            conninfo,
            application_name=self.application_name,
            statement_timeout_ms=int(self.statement_timeout * 1000),
            idle_in_transaction_timeout_ms=_IDLE_IN_TRANSACTION_MS,
            extra_options=self.server_options,
        )
        conn.prepare_threshold = None  # no server-side prepared statements on this session
        try:
            row = conn.execute(self.sql.leader_session_settings).fetchone()
            assert row is not None
            if row[0] != str(_IDLE_IN_TRANSACTION_MS):
                self._set_options(conn)
            conn.add_notify_handler(self._on_notify)
            subscribe(conn, self.channel)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.backend_pid = int(row[1])
        return conn

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a round of statements on the session; the watchdog ends a round that takes
        longer than the trust window by shutting the socket down, which fails the statement."""
        with self._watchdog.busy():
            yield

    def _set_options(self, conn: psycopg.Connection) -> None:
        """A pooler in session mode (pgbouncer) drops the options sent at connect: set them
        on the session instead, which it keeps."""
        if not self._warned_options:
            log.warning(
                "the database session did not get the options jobqd connects with (a pooler "
                "in session mode?); setting them on the session instead"
            )
            self._warned_options = True
        settings = {
            "statement_timeout": str(int(self.statement_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(_IDLE_IN_TRANSACTION_MS),
            **self.server_options,
        }
        for name, value in settings.items():
            conn.execute(self.sql.leader_set_option, {"name": name, "value": value})

    def _on_notify(self, _notify: psycopg.Notify) -> None:
        self.released = True

    @property
    def socket(self) -> int | None:
        """The session's socket, readable when a notification (or an error) arrives."""
        return self.conn.pgconn.socket if self.connected else None  # type: ignore[union-attr]

    def try_acquire(self) -> bool:
        """One non-blocking try for the lock; True when this session now holds it."""
        conn = self.open()
        self.released = False
        row = conn.execute(self.sql.leader_try_lock, {"key": self.key}).fetchone()
        assert row is not None
        if not row[0]:
            return False
        self.held = True
        self.backend_pid = int(row[1])
        self.verify()
        return True

    def verify(self) -> datetime:
        """Prove the lock is still held by this session's backend; returns the database time.

        Raises LeadershipLost, or PoolerDetected when the session moved to another backend.
        """
        if not self.held or self.conn is None or self.conn.closed:
            raise LeadershipLost("the leader session is closed")
        row = self.conn.execute(self.sql.leader_verify, self._key_parts).fetchone()
        assert row is not None
        backend_pid, held, now = row
        if backend_pid != self.backend_pid:
            self.held = False
            raise PoolerDetected(
                pooler_message(
                    self.dsn,
                    f"answered from backend {backend_pid} after the lock was taken on "
                    f"backend {self.backend_pid}",
                )
            )
        if not held:
            self.held = False
            raise LeadershipLost("the leader lock is no longer held by this session")
        self.verified_at = time.monotonic()
        return now

    def trusted(self) -> bool:
        """Held and verified recently enough to act as leader."""
        return self.held and time.monotonic() - self.verified_at < self.trust_window

    def release(self) -> None:
        """Free the lock and wake the standbys, before the session ends (which frees it too,
        but tells no one)."""
        if self.held and self.connected:
            self.held = False
            self.conn.execute(  # type: ignore[union-attr]
                self.sql.leader_release, {"key": self.key, "channel": self.channel}
            )

    def close(self) -> None:
        """End the session; the server frees the lock with it."""
        self.held = False
        self.verified_at = float("-inf")
        with self._watchdog.closing():
            if self.conn is not None:
                conn, self.conn = self.conn, None
                conn.close()

"""Connections: conninfo with the session settings every daemon session carries, and the
embedded Postgres used when no database is configured.

Every daemon session gets an `application_name` naming its process, a `statement_timeout` and
an `idle_in_transaction_session_timeout` (a stuck session must never hold locks for long), and
TCP keepalives so a dead peer is noticed in seconds rather than hours.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobqd.errors import DatabaseUnavailable, first_line

EMBEDDED = "embedded"

_embedded_lock = threading.Lock()
_embedded_servers: dict[Path, object] = {}


def default_data_dir() -> Path:
    """Where the embedded Postgres keeps its files when the config does not say: systemd's
    StateDirectory= when run as a unit, /var/lib/jobqd as root, else the user's data dir."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "pgdata"
    if os.geteuid() == 0:
        return Path("/var/lib/jobqd/pgdata")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "jobqd" / "pgdata"


def start_embedded(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Start (or join) the private Postgres in `data_dir`; return its connection URI.

    pgserver keeps a list of the processes using a data directory and reuses a running server,
    so a second jobqd on the same directory shares it instead of corrupting it; the server
    stops when the last of them exits.
    """
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers); its
            # fallback under /tmp is what we want anyway.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise DatabaseUnavailable(
            "database.url is 'embedded' but pgserver is not installed: "
            "pip install 'jobqd[embedded]', or set database.url to a PostgreSQL URL"
        ) from exc
    path = Path(data_dir) if data_dir else default_data_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    # pgserver narrates every step at INFO; only its warnings and errors are news to operators.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with _embedded_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = _embedded_servers.get(path)
        if server is None:
            server = pgserver.get_server(path, cleanup_mode="stop")
            _embedded_servers[path] = server
    return server.get_uri()  # type: ignore[attr-defined]


def resolve_url(url: str | None, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Turn a configured database URL (or 'embedded'/None) into a real conninfo."""
    if not url or url == EMBEDDED:
        return start_embedded(data_dir)
    return url


def session_conninfo(
    dsn: str,
    *,
    application_name: str,
    statement_timeout_ms: int | None = 30_000,
    idle_in_transaction_timeout_ms: int = 60_000,
    extra_options: dict[str, str] | None = None,
) -> str:
    """The caller's DSN plus jobqd's session settings, without losing options it already has."""
    params = conninfo_to_dict(dsn)
    options = [params.pop("options", "")] if params.get("options") else []
    settings = {"idle_in_transaction_session_timeout": str(idle_in_transaction_timeout_ms)}
    if statement_timeout_ms is not None:
        settings["statement_timeout"] = str(statement_timeout_ms)
    settings.update(extra_options or {})
    options += [f"-c {key}={value}" for key, value in settings.items()]
    # psycopg parses json/jsonb as UTF-8 bytes: whatever the database's encoding, the server
    # converts to UTF8 for jobqd's sessions.
    params["client_encoding"] = "UTF8"
    params.setdefault("connect_timeout", "10")
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
        raise DatabaseUnavailable(describe_failure(dsn, exc)) from exc


def subscribe(conn: psycopg.Connection, channel: str) -> None:
    """Subscribe `conn` to NOTIFYs on `channel`.

    The one statement built by hand: LISTEN takes an identifier, which cannot be a bound
    parameter, so the channel is quoted as one rather than named in the .sql files."""
    conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))


def describe_failure(dsn: str, exc: BaseException) -> str:
    params = conninfo_to_dict(dsn)
    where = params.get("host") or "localhost"
    if params.get("port"):
        where += f":{params['port']}"
    db = params.get("dbname", "")
    return (
        f"cannot connect to PostgreSQL at {where}/{db}: {first_line(exc)} "
        "(check that the server is running and database.url / --dsn / JOBQD_DATABASE_URL)"
    )

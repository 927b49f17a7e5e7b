"""Maintenance processes for tests: spawned through the same serve() the daemon forks, and
who holds the leader lock, read from pg_locks."""

from __future__ import annotations

import multiprocessing
import os

import psycopg
from helpers import LEDGER_DSN_ENV

from jobqd.config.settings import parse
from jobqd.maintenance.leader import current_leader
from jobqd.store import admin

FAST = """
maintenance: {interval: 200ms, standby_retry: 500ms}
reaper: {interval: 300ms, process_grace: 30s}
"""


def run_maintenance(yaml_text: str, dsn: str, writer=None) -> None:
    """Target of a spawned maintenance process."""
    os.environ[LEDGER_DSN_ENV] = dsn
    from jobqd.daemon.ipc import Sender
    from jobqd.maintenance.process import serve
    from jobqd.observe.logs import setup_logging

    setup_logging("json", "info", role="maintenance")
    settings = parse(yaml_text, "<test>", {"JOBQD_DATABASE_URL": dsn})
    sender = Sender(writer.fileno()) if writer is not None else None
    raise SystemExit(serve(settings, dsn, sender=sender))


def start(procs, dsn, yaml_text=FAST, writer=None):
    """Spawn a maintenance process and add it to `procs`, which the fixture tears down."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=run_maintenance, args=(yaml_text, dsn, writer), daemon=True)
    proc.start()
    procs.append(proc)
    return proc


def leader(dsn):
    """The lock holder's row: from pg_locks, so only the real holder counts."""
    with psycopg.connect(dsn, autocommit=True) as c:
        return current_leader(c, "jobqd")


def leader_pid(dsn):
    found = leader(dsn)
    return found["pid"] if found and found["pid"] else None


def claimed_leaders(dsn, alive):
    """OS pids of live maintenance processes that `jobqctl status` shows as leader (its
    processes list marks the lock holder's row, from pg_locks)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        listed = admin.status(c, "jobqd")["processes"]
    return sorted(
        p["pid"] for p in listed if p["role"] == "maintenance" and p["leader"] and p["pid"] in alive
    )

"""What one /metrics scrape of the http child exports, and in which format.

Four sources, one MetricStore per scrape: the node's totals the master fed (counters,
histograms and gauges the children reported), `jobqd_build_info`, the figures of this node's
processes read from /proc (the master, each child in the master's health report, this child),
and the database-wide gauges. Those are read with this child's own sessions, cached for
`GAUGE_TTL`, and exported only while this node's maintenance child holds the leader lock (read
from pg_locks, never from what the child says of itself), so a sum over nodes counts each job
once; every node exports `jobqd_leader` and `jobqd_database_up`.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from jobqd.errors import DatabaseUnavailable, first_line
from jobqd.observe import procstat
from jobqd.observe.metrics import (
    DatabaseMetrics,
    MetricStore,
    ProcessMetrics,
    define_database_metrics,
    define_jobqd_metrics,
    define_process_metrics,
)
from jobqd.store import admin

log = logging.getLogger("jobqd.http")

GAUGE_TTL = 1.0
"""Seconds a database reading serves scrapes: a scrape costs at most one query a second."""


def build_labels() -> tuple[str, str, str, str]:
    """(jobqd, Python, psycopg, libpq) versions for jobqd_build_info."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        jobqd_version = version("jobqd")
    except PackageNotFoundError:
        jobqd_version = "unknown"
    libpq = psycopg.pq.version()
    return (
        jobqd_version,
        platform.python_version(),
        psycopg.__version__,
        f"{libpq // 10000}.{libpq % 10000}",
    )


@dataclass(frozen=True)
class Reading:
    """One look at the database for /metrics."""

    up: bool  # it answered
    leads: bool  # this node's maintenance child holds the leader lock
    depth: dict[tuple[str, str], int] | None = None  # only when leading
    oldest: dict[str, float] | None = None
    health: dict[str, Any] | None = None


class Scrape:
    """The http child's /metrics: `body(snapshot, health, accept)` for each request."""

    def __init__(
        self,
        settings: Any,
        session: Callable[[], Any],
        *,
        master_pid: int | None,
    ) -> None:
        self.settings = settings
        self.schema = settings.database.schema
        self.session = session
        self.master_pid = master_pid
        self.build = build_labels()
        self._lock = threading.Lock()
        self._reading = Reading(up=False, leads=False)
        self._read_at = -float("inf")

    def body(
        self, snapshot: dict[str, Any], health: dict[str, Any] | None, accept: str | None
    ) -> tuple[bytes, str]:
        """The exposition of one scrape and its Content-Type (as `accept` asks)."""
        store = MetricStore()
        metrics = define_jobqd_metrics(store)
        database_up = store.gauge(
            "jobqd_database_up", "1 when this node's http process could read the database, else 0."
        )
        store.merge(snapshot)
        self._measure_processes(define_process_metrics(store), health)
        reading = self.reading(health)
        database_up.set(1 if reading.up else 0)
        metrics.leader.set(1 if reading.leads else 0)
        for (queue, state), jobs in (reading.depth or {}).items():
            metrics.queue_jobs.set(jobs, queue, state)
        for queue, age in (reading.oldest or {}).items():
            metrics.queue_oldest_job_age.set(age, queue)
        if reading.health is not None:
            _set_database_health(define_database_metrics(store), reading.health)
        return store.exposition(accept)

    # -- this node's processes ----------------------------------------------------------

    def _measure_processes(self, metrics: ProcessMetrics, health: dict[str, Any] | None) -> None:
        metrics.build_info.set(1, *self.build)
        processes: list[tuple[int | None, str, str, str]] = [
            (self.master_pid, "master", "", ""),
            (os.getpid(), "http", "", ""),
        ]
        for child in ((health or {}).get("children") or {}).values():
            if not isinstance(child, dict):
                continue
            role, queue = str(child.get("role") or ""), str(child.get("queue") or "")
            index = str(child.get("index", 0)) if role == "worker" else ""
            metrics.restarts.inc(role, queue, index, amount=int(child.get("restarts") or 0))
            if role != "http":
                processes.append((child.get("pid"), role, queue, index))
        for pid, role, queue, index in processes:
            stat = procstat.read(pid) if isinstance(pid, int) else None
            if stat is None:
                continue
            metrics.resident_memory.set(stat.rss_bytes, role, queue, index)
            metrics.cpu_seconds.inc(role, queue, index, amount=stat.cpu_seconds)
            metrics.start_time.set(stat.started_at, role, queue, index)

    # -- the database ---------------------------------------------------------------------

    def reading(self, health: dict[str, Any] | None) -> Reading:
        """The database's figures, read at most once per GAUGE_TTL by one thread."""
        with self._lock:
            if time.monotonic() - self._read_at >= GAUGE_TTL:
                self._reading = self._read(health)
                self._read_at = time.monotonic()
            return self._reading

    def _read(self, health: dict[str, Any] | None) -> Reading:
        """The leader lock's holder, and only if it is this node's maintenance child the
        job counts and the database's health, in one session."""
        try:
            with self.session() as conn:
                holder = admin.leader(conn, self.schema)
                if holder is None or not _leads_here(holder, health):
                    return Reading(up=True, leads=False)
                depth, oldest = admin.queue_depth(conn, self.schema)
                return Reading(True, True, depth, oldest, self._database_health(conn))
        except (psycopg.Error, DatabaseUnavailable) as exc:
            log.warning("cannot read the database for /metrics: %s", first_line(exc))
            return Reading(up=False, leads=False)

    def _database_health(self, conn: psycopg.Connection) -> dict[str, Any] | None:
        """admin.database_health, or None when it cannot be read (the job counts still are)."""
        try:
            with conn.transaction():
                return admin.database_health(conn, self.schema, self.settings.database_health)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            log.warning("cannot read the database's health for /metrics: %s", first_line(exc))
            return None


def _set_database_health(metrics: DatabaseMetrics, health: dict[str, Any]) -> None:
    database = health["database"]
    holder = health["vacuum_holder"] or {"age": 0.0, "xid_age": 0}
    if holder["age"] is not None:
        metrics.vacuum_holder_age.set(holder["age"], database)
    metrics.vacuum_holder_xid_age.set(holder["xid_age"], database)
    if health["vacuum_held_back"]:
        pid = "" if holder["pid"] is None else str(holder["pid"])
        names = (holder["application_name"] or "", holder["name"] or "", holder["state"] or "")
        metrics.vacuum_holder.set(1, database, holder["kind"], pid, *names)
    for table in health["tables"]:
        name = table["table"]
        metrics.dead_tuples.set(table["dead_tuples"], database, name)
        metrics.live_tuples.set(table["live_tuples"], database, name)
        vacuumed = table["vacuumed_at"]
        metrics.last_vacuum.set(vacuumed.timestamp() if vacuumed else 0, database, name)
    metrics.health_warnings.set(len(health["warnings"]), database)


def _leads_here(holder: dict[str, Any], health: dict[str, Any] | None) -> bool:
    """Whether the leader lock's holder is this node's maintenance child."""
    if health is None or holder.get("host") != socket.gethostname():
        return False
    maintenance = (health.get("children") or {}).get("maintenance") or {}
    return maintenance.get("pid") is not None and holder.get("pid") == maintenance["pid"]

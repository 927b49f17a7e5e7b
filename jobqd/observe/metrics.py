"""Counters, gauges and histograms added up in the master, exposed through prometheus_client.

The master is forked from and holds no threads, so there is no shared memory between
processes: each child counts into its own :class:`MetricStore` and sends
:meth:`MetricStore.snapshot_delta` up its pipe with its heartbeat; the master
:meth:`MetricStore.merge` s those deltas into totals that outlive child restarts, and the
http child turns a store into the ``/metrics`` body with :meth:`MetricStore.exposition`: a
custom prometheus_client collector over the store, so the text format (0.0.4, or OpenMetrics
when the scraper asks for it) and its escaping are the library's.

Gauges are absolute values. The master keeps, per gauge sample, the last value each
*source* (child) reported and renders their sum, so that two workers of one queue add up;
call :meth:`MetricStore.forget` when a child exits. Without a source, the last write wins.

Why not prometheus_client's own metrics and its multiprocess mode: that mode keeps one mmap
file per process and metric in a shared directory that must be wiped at start and pruned when
a child dies, and it cannot keep a counter going across a child's restart without keeping the
dead child's files. The children already report to the master through a pipe each second, so
adding a delta there is less machinery, keeps nothing on disk and costs the hot path one dict
update per batch; only the rendering is the library's.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
"""Queue wait runs from milliseconds (idle slots) to hours (a backlog)."""

Labels = tuple[str, ...]
Delta = dict[str, list[list[Any]]]
"""``{family name: [[label values, value...], ...]}``: plain JSON, for the child→master pipe."""

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class _Family:
    """One declared metric: name, help text, label names and its samples keyed by labels."""

    kind: ClassVar[str]

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labels:
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} in {name}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate label names in {name}")
        self.name = name
        self.help = help
        self.labels: Labels = tuple(labels)
        self._arity = len(self.labels)
        self._lock = threading.Lock()
        self._values: dict[Labels, Any] = {}

    def _same(self, other: _Family) -> bool:
        return type(self) is type(other) and self.labels == other.labels

    def _wrong_arity(self, labels: Labels) -> ValueError:
        return ValueError(f"{self.name} takes labels {self.labels}, got {labels!r}")

    def _key(self, raw: Any) -> Labels:
        if not isinstance(raw, list | tuple) or len(raw) != self._arity:
            raise self._wrong_arity(raw)
        return tuple(str(value) for value in raw)

    def _take(self) -> list[list[Any]]:
        with self._lock:
            values, self._values = self._values, {}
        return [[list(labels), value] for labels, value in values.items()]

    def _peek(self) -> list[list[Any]]:
        with self._lock:
            return [[list(labels), value] for labels, value in self._values.items()]

    def _merge(self, entries: list[Any], source: str | None) -> None:
        parsed = [(self._key(labels), float(value)) for labels, value in entries]
        with self._lock:
            for labels, value in parsed:
                self._values[labels] = self._values.get(labels, 0.0) + value

    def _forget(self, source: str) -> None:
        """Drop what ``source`` contributed; only gauges keep per-source values."""

    def _reset(self) -> None:
        with self._lock:
            self._values = {}

    def _rows(self) -> list[tuple[Labels, Any]]:
        with self._lock:
            return sorted(self._values.items())

    def _collect(self) -> Metric:
        """The library's metric family for this one; a family without labels shows 0 rather
        than nothing until it is first written."""
        family = self._library_family()
        rows = self._rows()
        if not rows and not self.labels:
            rows = [((), 0)]
        for labels, value in rows:
            family.add_metric(labels, value)
        return family

    def _library_family(self) -> Any:
        raise NotImplementedError


class Counter(_Family):
    """A monotonic count; the master adds up children's increments."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        super().__init__(name, help, labels)

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Add ``amount`` to the sample with these label values (in declared order)."""
        if len(labels) != self._arity:
            raise self._wrong_arity(labels)
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up")
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount

    def _library_family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.help, labels=self.labels)


class Gauge(_Family):
    """A current value. Local writes are last-wins; merged sources are summed at render."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._changed: set[Labels] = set()
        self._sources: dict[str, dict[Labels, float]] = {}

    def set(self, value: float, *labels: str) -> None:
        """Set the sample with these label values (in declared order) to ``value``."""
        if len(labels) != self._arity:
            raise self._wrong_arity(labels)
        with self._lock:
            self._values[labels] = value
            self._changed.add(labels)

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Add ``amount`` (which may be negative) to the sample with these label values."""
        if len(labels) != self._arity:
            raise self._wrong_arity(labels)
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount
            self._changed.add(labels)

    def _take(self) -> list[list[Any]]:
        """Samples written since the last call; the values themselves are kept."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return [[list(labels), self._values[labels]] for labels in changed]

    def _peek(self) -> list[list[Any]]:
        return [[list(labels), value] for labels, value in self._rows()]

    def _merge(self, entries: list[Any], source: str | None) -> None:
        parsed = [(self._key(labels), float(value)) for labels, value in entries]
        with self._lock:
            if source is None:
                self._values.update(parsed)
                self._changed.update(labels for labels, _ in parsed)
            else:
                self._sources.setdefault(source, {}).update(parsed)

    def _forget(self, source: str) -> None:
        with self._lock:
            self._sources.pop(source, None)

    def _reset(self) -> None:
        with self._lock:
            self._values, self._changed, self._sources = {}, set(), {}

    def _library_family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)

    def _rows(self) -> list[tuple[Labels, Any]]:
        with self._lock:
            total = dict(self._values)
            for values in self._sources.values():
                for labels, value in values.items():
                    total[labels] = total.get(labels, 0) + value
        return sorted(total.items())


class Histogram(_Family):
    """Observations counted into fixed buckets, plus their sum.

    A sample is ``[count per bucket..., count above the last bucket, sum]``, not cumulative,
    so that deltas add up; the exposition makes the counts cumulative.
    """

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        if "le" in labels:
            raise ValueError(f"histogram {name!r} cannot use the label name 'le'")
        bounds = tuple(float(bound) for bound in buckets)
        if not bounds or any(not math.isfinite(bound) for bound in bounds):
            raise ValueError(f"histogram {name!r} needs finite bucket bounds")
        if any(low >= high for low, high in itertools.pairwise(bounds)):
            raise ValueError(f"histogram {name!r} bucket bounds must increase")
        super().__init__(name, help, labels)
        self.buckets = bounds
        self._width = len(bounds) + 1

    def _same(self, other: _Family) -> bool:
        return super()._same(other) and self.buckets == getattr(other, "buckets", None)

    def observe(self, value: float, *labels: str) -> None:
        """Count ``value`` for the sample with these label values (in declared order)."""
        if len(labels) != self._arity:
            raise self._wrong_arity(labels)
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            row = self._values.get(labels)
            if row is None:
                row = self._values[labels] = [0] * self._width + [0.0]
            row[index] += 1
            row[-1] += value

    def observe_many(self, values: Sequence[float], *labels: str) -> None:
        """Count every one of ``values`` under one lock: a batch's observations at once."""
        if len(labels) != self._arity:
            raise self._wrong_arity(labels)
        if not values:
            return
        bounds, find, total = self.buckets, bisect.bisect_left, sum(values)
        with self._lock:
            row = self._values.get(labels)
            if row is None:
                row = self._values[labels] = [0] * self._width + [0.0]
            for value in values:
                row[find(bounds, value)] += 1
            row[-1] += total

    def _take(self) -> list[list[Any]]:
        return [[labels, row[:-1], row[-1]] for labels, row in super()._take()]

    def _peek(self) -> list[list[Any]]:
        with self._lock:
            return [[list(k), row[:-1], row[-1]] for k, row in self._values.items()]

    def _merge(self, entries: list[Any], source: str | None) -> None:
        parsed = []
        for labels, counts, total in entries:
            if len(counts) != self._width:
                raise ValueError(f"{self.name}: expected {self._width} bucket counts")
            parsed.append((self._key(labels), [int(count) for count in counts], float(total)))
        with self._lock:
            for labels, counts, total in parsed:
                row = self._values.get(labels)
                if row is None:
                    row = self._values[labels] = [0] * self._width + [0.0]
                for index, count in enumerate(counts):
                    row[index] += count
                row[-1] += total

    def _rows(self) -> list[tuple[Labels, Any]]:
        with self._lock:
            return sorted((labels, list(row)) for labels, row in self._values.items())

    def _collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        rows = self._rows()
        if not rows and not self.labels:
            rows = [((), [0] * self._width + [0.0])]
        bounds = [floatToGoString(bound) for bound in self.buckets] + ["+Inf"]
        for labels, row in rows:
            cumulative = list(itertools.accumulate(row[:-1]))
            family.add_metric(labels, list(zip(bounds, cumulative, strict=True)), row[-1])
        return family


_F = TypeVar("_F", bound=_Family)


class MetricStore:
    """The metric families of one process, by name, in declaration order.

    Each process needs its own values: a child forked from the master must :meth:`reset`
    (or build a new MetricStore) before counting, or it would send the master's totals back.
    """

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return self._declare(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        return self._declare(Gauge(name, help, labels))

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> Histogram:
        return self._declare(Histogram(name, help, labels, buckets))

    def _declare(self, family: _F) -> _F:
        existing = self._families.get(family.name)
        if existing is None:
            self._families[family.name] = family
            return family
        if not existing._same(family):
            raise ValueError(f"metric {family.name} is already declared differently")
        return existing  # type: ignore[return-value]

    def __getitem__(self, name: str) -> _Family:
        return self._families[name]

    def __contains__(self, name: object) -> bool:
        return name in self._families

    def snapshot_delta(self) -> Delta:
        """What changed since the last call, then forget it: counter and histogram increments,
        gauges written. Empty when nothing changed, so a child can skip sending."""
        delta: Delta = {}
        for name, family in self._families.items():
            entries = family._take()
            if entries:
                delta[name] = entries
        return delta

    def snapshot(self) -> Delta:
        """Everything, in the delta format, without resetting; gauges as rendered.

        Merged into an empty MetricStore it reproduces this one: how the master feeds a freshly
        started ``http`` child before forwarding further deltas.
        """
        snap: Delta = {}
        for name, family in self._families.items():
            entries = family._peek()
            if entries:
                snap[name] = entries
        return snap

    def merge(self, delta: Mapping[str, Any], source: str | None = None) -> None:
        """Add a child's delta. Malformed parts are logged and skipped, never raised, so a
        confused child cannot take the master down."""
        for name, entries in delta.items():
            family = self._families.get(name)
            if family is None:
                log.warning("metrics delta for undeclared metric %r skipped", name)
                continue
            try:
                family._merge(entries, source)
            except (TypeError, ValueError) as exc:
                log.warning("malformed metrics delta for %s skipped: %s", name, exc)

    def forget(self, source: str) -> None:
        """Drop the gauge values reported by ``source`` (a child that exited)."""
        for family in self._families.values():
            family._forget(source)

    def reset(self) -> None:
        """Zero every value, keeping the declarations."""
        for family in self._families.values():
            family._reset()

    def collect(self) -> Iterator[Metric]:
        """Every family as prometheus_client metrics: the store is a custom collector."""
        for family in self._families.values():
            yield family._collect()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The ``/metrics`` body and its Content-Type, in the format the scraper's Accept
        header asks for (OpenMetrics, else the text format 0.0.4), written by the library."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type


LEADER_ONLY = (
    " Read from the database, exported only by the node whose maintenance process holds the"
    " leader lock, so a sum over nodes counts the database once."
)


@dataclass(frozen=True)
class JobqdMetrics:
    """Handles on jobqd's own metrics; label values go in the order given in each comment."""

    jobs_started: Counter  # queue, task
    jobs_succeeded: Counter  # queue, task
    jobs_failed: Counter  # queue, task
    jobs_retried: Counter  # queue, task
    jobs_dead: Counter  # queue, task
    job_duration: Histogram  # queue, task
    lease_expirations: Counter  # queue
    cron_fires: Counter  # entry
    child_restarts: Counter  # role
    child_crash_looping: Gauge  # role, queue
    queue_jobs: Gauge  # queue, state
    queue_oldest_job_age: Gauge  # queue
    leader: Gauge
    workers_busy: Gauge  # queue
    workers_slots: Gauge  # queue
    queue_wait: Histogram  # queue
    up: Gauge


def define_jobqd_metrics(store: MetricStore) -> JobqdMetrics:
    """Declare jobqd's metrics on ``store``; the same in every process, so deltas match."""
    job = ("queue", "task")
    return JobqdMetrics(
        jobs_started=store.counter(
            "jobqd_jobs_started_total", "Attempts started: jobs claimed and handed to a slot.", job
        ),
        jobs_succeeded=store.counter(
            "jobqd_jobs_succeeded_total", "Attempts that returned without raising.", job
        ),
        jobs_failed=store.counter("jobqd_jobs_failed_total", "Attempts that raised.", job),
        jobs_retried=store.counter(
            "jobqd_jobs_retried_total", "Failed attempts put back in the queue to run again.", job
        ),
        jobs_dead=store.counter(
            "jobqd_jobs_dead_total", "Jobs marked dead: out of attempts or discarded.", job
        ),
        job_duration=store.histogram(
            "jobqd_job_duration_seconds",
            "Time an attempt ran in its slot, whatever its outcome.",
            job,
            DURATION_BUCKETS,
        ),
        lease_expirations=store.counter(
            "jobqd_lease_expirations_total",
            "Running jobs whose lease expired and which the reaper took back.",
            ("queue",),
        ),
        cron_fires=store.counter(
            "jobqd_cron_fires_total", "Cron ticks that enqueued their job.", ("entry",)
        ),
        child_restarts=store.counter(
            "jobqd_child_restarts_total",
            "Child processes restarted after exiting unexpectedly.",
            ("role",),
        ),
        child_crash_looping=store.gauge(
            "jobqd_child_crash_looping",
            "Child processes of this kind (and queue, for workers) that are crash-looping.",
            ("role", "queue"),
        ),
        queue_jobs=store.gauge(
            "jobqd_queue_jobs",
            "Jobs per queue and state, counted in the database." + LEADER_ONLY,
            ("queue", "state"),
        ),
        queue_oldest_job_age=store.gauge(
            "jobqd_queue_oldest_job_age_seconds",
            "How long the oldest due queued job has waited past its run_at." + LEADER_ONLY,
            ("queue",),
        ),
        leader=store.gauge(
            "jobqd_leader", "1 while this node's maintenance process is the leader, else 0."
        ),
        workers_busy=store.gauge(
            "jobqd_workers_busy", "Slots running a job in this node's workers.", ("queue",)
        ),
        workers_slots=store.gauge(
            "jobqd_workers_slots",
            "Slots of this node's running workers (concurrency times processes): capacity.",
            ("queue",),
        ),
        queue_wait=store.histogram(
            "jobqd_job_queue_wait_seconds",
            "Pickup latency: how long a job waited between becoming due and its claim "
            "(database clock).",
            ("queue",),
            WAIT_BUCKETS,
        ),
        up=store.gauge("jobqd_up", "1 while the jobqd master is running."),
    )


@dataclass(frozen=True)
class DatabaseMetrics:
    """Handles on the gauges of the database's own health, set by the http child only."""

    vacuum_holder_age: Gauge  # database
    vacuum_holder_xid_age: Gauge  # database
    vacuum_holder: Gauge  # database, kind, pid, application_name, name, state
    dead_tuples: Gauge  # database, table
    live_tuples: Gauge  # database, table
    last_vacuum: Gauge  # database, table
    health_warnings: Gauge  # database


def define_database_metrics(store: MetricStore) -> DatabaseMetrics:
    """Declare the jobqd_database_* health gauges on ``store``."""
    table = ("database", "table")
    return DatabaseMetrics(
        vacuum_holder_age=store.gauge(
            "jobqd_database_vacuum_holder_age_seconds",
            "How long the oldest transaction or snapshot holding back vacuum has been open; 0 "
            "when none, absent when its start is hidden from jobqd's role (grant "
            "pg_read_all_stats) or unknown (a replication slot)." + LEADER_ONLY,
            ("database",),
        ),
        vacuum_holder_xid_age=store.gauge(
            "jobqd_database_vacuum_holder_xid_age",
            "Transactions the oldest holder of vacuum's horizon is behind (age of its xmin); "
            "0 when none." + LEADER_ONLY,
            ("database",),
        ),
        vacuum_holder=store.gauge(
            "jobqd_database_vacuum_holder",
            "1 for the holder of vacuum's horizon while it is over a database_health "
            "threshold, naming it (kind: session, prepared transaction or replication slot; "
            "name: the transaction's gid or the slot's name)." + LEADER_ONLY,
            ("database", "kind", "pid", "application_name", "name", "state"),
        ),
        dead_tuples=store.gauge(
            "jobqd_database_dead_tuples",
            "Dead tuples in each of jobqd's tables (pg_stat_user_tables.n_dead_tup)." + LEADER_ONLY,
            table,
        ),
        live_tuples=store.gauge(
            "jobqd_database_live_tuples",
            "Live tuples in each of jobqd's tables (pg_stat_user_tables.n_live_tup)." + LEADER_ONLY,
            table,
        ),
        last_vacuum=store.gauge(
            "jobqd_database_last_vacuum_timestamp_seconds",
            "When each of jobqd's tables was last vacuumed, by VACUUM or autovacuum (Unix "
            "time; 0: never)." + LEADER_ONLY,
            table,
        ),
        health_warnings=store.gauge(
            "jobqd_database_health_warnings",
            "database_health thresholds exceeded now (each is a warning in jobqctl status)."
            + LEADER_ONLY,
            ("database",),
        ),
    )


@dataclass(frozen=True)
class ProcessMetrics:
    """Handles on what the http child measures of this node's processes at each scrape."""

    build_info: Gauge  # version, python, psycopg, libpq
    resident_memory: Gauge  # role, queue, index
    cpu_seconds: Counter  # role, queue, index
    start_time: Gauge  # role, queue, index
    restarts: Counter  # role, queue, index


def define_process_metrics(store: MetricStore) -> ProcessMetrics:
    """Declare jobqd_build_info and the per-process jobqd_process_* families on ``store``."""
    process = ("role", "queue", "index")
    return ProcessMetrics(
        build_info=store.gauge(
            "jobqd_build_info",
            "Always 1; the labels say which jobqd, Python, psycopg and libpq this node runs.",
            ("version", "python", "psycopg", "libpq"),
        ),
        resident_memory=store.gauge(
            "jobqd_process_resident_memory_bytes",
            "Resident memory of each of this node's processes (the master, each child), as "
            "max_memory compares it.",
            process,
        ),
        cpu_seconds=store.counter(
            "jobqd_process_cpu_seconds_total",
            "User and system CPU time of each of this node's processes; starts again at 0 "
            "when a child is replaced.",
            process,
        ),
        start_time=store.gauge(
            "jobqd_process_start_time_seconds",
            "When each of this node's processes started (Unix time).",
            process,
        ),
        restarts=store.counter(
            "jobqd_process_restarts_total",
            "Restarts after an unexpected exit of each child, by its role, queue and index "
            "(jobqd_child_restarts_total is the sum by role).",
            process,
        ),
    )

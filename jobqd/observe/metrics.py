"""Counters, gauges and histograms added up in the master, rendered as Prometheus text.

The master is forked from and holds no threads, so there is no shared memory between
processes: each child counts into its own :class:`MetricStore` and sends
:meth:`MetricStore.snapshot_delta` up its pipe with its heartbeat; the master
:meth:`MetricStore.merge` s those deltas into totals that outlive child restarts, and
:meth:`MetricStore.render` gives the ``/metrics`` body (text format 0.0.4).

Gauges are absolute values. The master keeps, per gauge sample, the last value each
*source* (child) reported and renders their sum, so that two workers of one queue add up;
call :meth:`MetricStore.forget` when a child exits. Without a source, the last write wins.

Why not prometheus_client: its multiprocess mode keeps one mmap file per process and metric
in a shared directory that must be wiped at start and pruned when a child dies, and it cannot
keep a counter going across a child's restart without keeping the dead child's files. The
children already report to the master through a pipe each second, so adding a delta there is
less machinery, keeps nothing on disk and costs the hot path one dict update per batch.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

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

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        rows = self._rows()
        if not rows and not self.labels:
            rows = [((), 0)]
        for labels, value in rows:
            out.append(f"{self.name}{_labels(self.labels, labels)} {_number(value)}")


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
    so that deltas add up; :meth:`render` makes the counts cumulative.
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

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} histogram")
        rows = self._rows()
        if not rows and not self.labels:
            rows = [((), [0] * self._width + [0.0])]
        bounds = [_number(bound, point=True) for bound in self.buckets] + ["+Inf"]
        for labels, row in rows:
            cumulative = 0
            for bound, count in zip(bounds, row[:-1], strict=True):
                cumulative += count
                le = _labels((*self.labels, "le"), (*labels, bound))
                out.append(f"{self.name}_bucket{le} {cumulative}")
            rendered = _labels(self.labels, labels)
            out.append(f"{self.name}_sum{rendered} {_number(row[-1])}")
            out.append(f"{self.name}_count{rendered} {cumulative}")


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

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every family."""
        out: list[str] = []
        for family in self._families.values():
            family._render(out)
        return "\n".join(out) + "\n" if out else ""


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = zip(names, values, strict=True)
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in pairs) + "}"


def _escape_label(value: str) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value: float, point: bool = False) -> str:
    """Go-parsable float text; whole numbers without ``.0`` unless ``point`` (bucket bounds)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if not point and float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


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
            "Jobs per queue and state, counted in the database.",
            ("queue", "state"),
        ),
        queue_oldest_job_age=store.gauge(
            "jobqd_queue_oldest_job_age_seconds",
            "How long the oldest due queued job has waited past its run_at.",
            ("queue",),
        ),
        leader=store.gauge(
            "jobqd_leader", "1 while this node's maintenance process is the leader, else 0."
        ),
        workers_busy=store.gauge(
            "jobqd_workers_busy", "Slots running a job in this node's workers.", ("queue",)
        ),
        up=store.gauge("jobqd_up", "1 while the jobqd master is running."),
    )


_SAME_ON_EVERY_NODE = (
    " Read from the database by each node's http child, so every node reports the same value:"
    " aggregate with max by (database), never sum."
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
            "pg_read_all_stats) or unknown (a replication slot)." + _SAME_ON_EVERY_NODE,
            ("database",),
        ),
        vacuum_holder_xid_age=store.gauge(
            "jobqd_database_vacuum_holder_xid_age",
            "Transactions the oldest holder of vacuum's horizon is behind (age of its xmin); "
            "0 when none." + _SAME_ON_EVERY_NODE,
            ("database",),
        ),
        vacuum_holder=store.gauge(
            "jobqd_database_vacuum_holder",
            "1 for the holder of vacuum's horizon while it is over a database_health "
            "threshold, naming it (kind: session, prepared transaction or replication slot; "
            "name: the transaction's gid or the slot's name)." + _SAME_ON_EVERY_NODE,
            ("database", "kind", "pid", "application_name", "name", "state"),
        ),
        dead_tuples=store.gauge(
            "jobqd_database_dead_tuples",
            "Dead tuples in each of jobqd's tables (pg_stat_user_tables.n_dead_tup)."
            + _SAME_ON_EVERY_NODE,
            table,
        ),
        live_tuples=store.gauge(
            "jobqd_database_live_tuples",
            "Live tuples in each of jobqd's tables (pg_stat_user_tables.n_live_tup)."
            + _SAME_ON_EVERY_NODE,
            table,
        ),
        last_vacuum=store.gauge(
            "jobqd_database_last_vacuum_timestamp_seconds",
            "When each of jobqd's tables was last vacuumed, by VACUUM or autovacuum (Unix "
            "time; 0: never)." + _SAME_ON_EVERY_NODE,
            table,
        ),
        health_warnings=store.gauge(
            "jobqd_database_health_warnings",
            "database_health thresholds exceeded now (each is a warning in jobqctl status)."
            + _SAME_ON_EVERY_NODE,
            ("database",),
        ),
    )

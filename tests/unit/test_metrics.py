import json
import threading

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from jobqd.observe.metrics import (
    DURATION_BUCKETS,
    JobqdMetrics,
    MetricStore,
    define_jobqd_metrics,
)


def _process() -> tuple[MetricStore, JobqdMetrics]:
    store = MetricStore()
    return store, define_jobqd_metrics(store)


def _via_pipe(delta: dict) -> dict:
    return json.loads(json.dumps(delta))


def _text(store: MetricStore) -> str:
    body, content_type = store.exposition()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return body.decode()


def _samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} from a real Prometheus parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _families(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def test_master_adds_up_two_children():
    child_a, a = _process()
    child_b, b = _process()
    master, _ = _process()

    for _ in range(3):
        a.jobs_started.inc("emails", "send_welcome")
    a.jobs_failed.inc("emails", "send_welcome")
    b.jobs_started.inc("emails", "send_welcome", amount=2)
    b.jobs_started.inc("default", "report")
    master.merge(_via_pipe(child_a.snapshot_delta()), source="a")
    master.merge(_via_pipe(child_b.snapshot_delta()), source="b")

    a.jobs_started.inc("emails", "send_welcome")
    master.merge(_via_pipe(child_a.snapshot_delta()), source="a")

    samples = _samples(_text(master))
    started = "jobqd_jobs_started_total"
    assert samples[(started, (("queue", "emails"), ("task", "send_welcome")))] == 6
    assert samples[(started, (("queue", "default"), ("task", "report")))] == 1
    assert samples[("jobqd_jobs_failed_total", (("queue", "emails"), ("task", "send_welcome")))]


def test_snapshot_delta_resets_and_is_empty_when_idle():
    child, m = _process()
    assert child.snapshot_delta() == {}
    m.jobs_succeeded.inc("q", "t")
    assert child.snapshot_delta() == {"jobqd_jobs_succeeded_total": [[["q", "t"], 1]]}
    assert child.snapshot_delta() == {}


def test_gauges_sum_across_children_and_are_forgotten():
    child_a, a = _process()
    child_b, b = _process()
    master, _ = _process()

    a.workers_busy.set(3, "emails")
    b.workers_busy.set(2, "emails")
    master.merge(_via_pipe(child_a.snapshot_delta()), source="emails#0")
    master.merge(_via_pipe(child_b.snapshot_delta()), source="emails#1")
    a.workers_busy.inc("emails", amount=-1)
    master.merge(_via_pipe(child_a.snapshot_delta()), source="emails#0")
    key = ("jobqd_workers_busy", (("queue", "emails"),))
    assert _samples(_text(master))[key] == 4

    master.forget("emails#1")
    assert _samples(_text(master))[key] == 2
    assert child_a.snapshot_delta() == {}


def test_gauge_without_source_is_last_write_wins():
    master, m = _process()
    master.merge({"jobqd_queue_jobs": [[["emails", "queued"], 10]]})
    master.merge({"jobqd_queue_jobs": [[["emails", "queued"], 7]]})
    m.up.set(1)
    samples = _samples(_text(master))
    assert samples[("jobqd_queue_jobs", (("queue", "emails"), ("state", "queued")))] == 7
    assert samples[("jobqd_up", ())] == 1


def test_histogram_buckets_are_cumulative_after_merge():
    child_a, a = _process()
    child_b, b = _process()
    master, _ = _process()
    for value in (0.003, 0.005, 0.2):
        a.job_duration.observe(value, "emails", "send")
    b.job_duration.observe(400, "emails", "send")
    b.job_duration.observe(1, "emails", "send")
    master.merge(_via_pipe(child_a.snapshot_delta()), source="a")
    master.merge(_via_pipe(child_b.snapshot_delta()), source="b")

    samples = _samples(_text(master))
    labels = (("queue", "emails"), ("task", "send"))

    def bucket(le: str) -> float:
        return samples[("jobqd_job_duration_seconds_bucket", (("le", le), *labels))]

    assert bucket("0.005") == 2
    assert bucket("0.01") == 2
    assert bucket("0.25") == 3
    assert bucket("1.0") == 4
    assert bucket("300.0") == 4
    assert bucket("+Inf") == 5
    assert samples[("jobqd_job_duration_seconds_count", labels)] == 5
    assert samples[("jobqd_job_duration_seconds_sum", labels)] == pytest.approx(401.208)
    counts = [bucket(repr(float(b))) for b in DURATION_BUCKETS]
    assert counts == sorted(counts)


def test_label_values_are_escaped():
    store, m = _process()
    nasty = 'a"b\\c\nd'
    m.jobs_dead.inc(nasty, "t")
    text = _text(store)
    assert 'queue="a\\"b\\\\c\\nd"' in text
    assert _samples(text)[("jobqd_jobs_dead_total", (("queue", nasty), ("task", "t")))] == 1


def test_render_is_valid_exposition():
    store, m = _process()
    m.cron_fires.inc("nightly-report")
    text = _text(store)

    assert text.endswith("\n") and "\n\n" not in text
    assert "# TYPE jobqd_jobs_started_total counter" in text
    assert "# HELP jobqd_job_duration_seconds " in text
    assert _families(text) == {
        "jobqd_jobs_started": "counter",
        "jobqd_jobs_succeeded": "counter",
        "jobqd_jobs_failed": "counter",
        "jobqd_jobs_retried": "counter",
        "jobqd_jobs_dead": "counter",
        "jobqd_job_duration_seconds": "histogram",
        "jobqd_lease_expirations": "counter",
        "jobqd_cron_fires": "counter",
        "jobqd_child_restarts": "counter",
        "jobqd_child_crash_looping": "gauge",
        "jobqd_queue_jobs": "gauge",
        "jobqd_queue_oldest_job_age_seconds": "gauge",
        "jobqd_leader": "gauge",
        "jobqd_workers_busy": "gauge",
        "jobqd_workers_slots": "gauge",
        "jobqd_job_queue_wait_seconds": "histogram",
        "jobqd_up": "gauge",
    }
    samples = _samples(text)
    assert samples[("jobqd_cron_fires_total", (("entry", "nightly-report"),))] == 1
    assert samples[("jobqd_leader", ())] == 0


def test_openmetrics_when_the_scraper_asks_for_it():
    store, m = _process()
    m.jobs_started.inc("q", "t", amount=3)
    m.up.set(1)
    accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"
    body, content_type = store.exposition(accept)
    text = body.decode()
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    assert "# TYPE jobqd_jobs_started counter" in text
    assert 'jobqd_jobs_started_total{queue="q",task="t"} 3.0' in text
    parsed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in openmetrics_families(text)
        for s in family.samples
    }
    assert parsed[("jobqd_jobs_started_total", (("queue", "q"), ("task", "t")))] == 3
    assert parsed[("jobqd_up", ())] == 1


def test_observe_many_counts_a_batch_like_single_observations():
    one, a = _process()
    many, b = _process()
    waits = [0.001, 0.3, 0.3, 42.0, 7200.0]
    for wait in waits:
        a.queue_wait.observe(wait, "q")
    b.queue_wait.observe_many(waits, "q")
    b.queue_wait.observe_many([], "q")
    assert one.snapshot_delta() == many.snapshot_delta()
    with pytest.raises(ValueError):
        b.queue_wait.observe_many(waits)


def test_snapshot_reproduces_totals_in_a_fresh_registry():
    child, c = _process()
    master, _ = _process()
    c.jobs_started.inc("q", "t")
    c.job_duration.observe(0.5, "q", "t")
    c.queue_oldest_job_age.set(12.5, "q")
    master.merge(_via_pipe(child.snapshot_delta()), source="maintenance")

    http, _ = _process()
    http.merge(_via_pipe(master.snapshot()))
    assert _text(http) == _text(master)
    assert master.snapshot() == master.snapshot()


def test_reset_zeroes_values():
    store, m = _process()
    m.jobs_started.inc("q", "t")
    m.workers_busy.set(1, "q")
    store.reset()
    assert store.snapshot_delta() == {}
    assert "jobqd_jobs_started_total{" not in _text(store)


def test_malformed_delta_is_skipped_not_raised(caplog):
    master, _ = _process()
    master.merge(
        {
            "jobqd_nope_total": [[["x"], 1]],
            "jobqd_jobs_started_total": [[["only-queue"], 1]],
            "jobqd_job_duration_seconds": [[["q", "t"], [1, 2], 0.1]],
            "jobqd_cron_fires_total": [[["ok"], 2]],
        }
    )
    samples = _samples(_text(master))
    assert samples[("jobqd_cron_fires_total", (("entry", "ok"),))] == 2
    assert not any(name.startswith("jobqd_jobs_started") for name, _ in samples)
    assert not any(name.startswith("jobqd_job_duration") for name, _ in samples)
    assert len(caplog.records) == 3


def test_wrong_label_count_raises():
    _, m = _process()
    with pytest.raises(ValueError):
        m.jobs_started.inc("only-queue")
    with pytest.raises(ValueError):
        m.leader.set(1, "extra")
    with pytest.raises(ValueError):
        m.jobs_started.inc("q", "t", amount=-1)


def test_declarations_are_validated():
    store = MetricStore()
    with pytest.raises(ValueError, match="_total"):
        store.counter("jobqd_things", "x")
    with pytest.raises(ValueError):
        store.histogram("h", "x", ("le",), (1,))
    with pytest.raises(ValueError):
        store.histogram("h", "x", (), (1, 1))
    with pytest.raises(ValueError):
        store.gauge("bad-name", "x")
    counter = store.counter("jobqd_things_total", "x", ("queue",))
    assert store.counter("jobqd_things_total", "x", ("queue",)) is counter
    with pytest.raises(ValueError):
        store.counter("jobqd_things_total", "x", ("task",))


def test_concurrent_increments_are_not_lost():
    store, m = _process()

    def work() -> None:
        for _ in range(10_000):
            m.jobs_started.inc("q", "t")
            m.job_duration.observe(0.01, "q", "t")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = _samples(_text(store))
    assert samples[("jobqd_jobs_started_total", (("queue", "q"), ("task", "t")))] == 80_000
    assert samples[("jobqd_job_duration_seconds_count", (("queue", "q"), ("task", "t")))] == 80_000


def test_queue_waits_run_from_the_due_time_on_the_database_clock():
    from jobqd.worker.executor import queue_waits

    # id, task, args, attempt, max_attempts, token, created_at, started_at, run_at (epoch s)
    rows = [
        (1, "t", "{}", 1, None, 11, 100.0, 100.25, 100.0),
        (2, "t", "{}", 3, None, 12, 50.0, 100.25, 99.75),  # a retry: due since its backoff ended
        (3, "t", "{}", 1, None, 13, 100.5, 100.25, 100.5),  # due after the claim's now()
        (4, "t", "{}", 1, None, 14, 40.0, 100.25, 100.0),  # enqueued with a 60 s delay
    ]
    assert queue_waits(rows) == [0.25, 0.5, 0.0, 0.25]

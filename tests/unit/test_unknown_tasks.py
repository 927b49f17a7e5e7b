"""The executor's answer to a job whose task it does not know (no database): a worker releases
it for another node, with one log line per minute rather than one per job; in-process test
helpers end it dead at once. A task name is never imported."""

from __future__ import annotations

import logging
import sys

from jobqd.tasks import Job, Registry, task
from jobqd.worker import executor
from jobqd.worker.executor import DEAD, UNHANDLED, Executor, Policy


def job(name: str, job_id: int = 1) -> Job:
    return Job(id=job_id, queue="q", task=name, attempt=1, max_attempts=5)


def test_a_worker_releases_unknown_tasks_with_one_line_a_minute(caplog, monkeypatch):
    registry = Registry()
    task("known", registry=registry)(lambda job: None)
    run = Executor(registry, Policy(release_unknown=True)).run
    with caplog.at_level(logging.WARNING, "jobqd.execute"):
        outcomes = [run(job(f"reports.user-{i}", i)) for i in range(500)]
    assert {o.state for o in outcomes} == {UNHANDLED}
    assert "unknown task 'reports.user-0'" in outcomes[0].error and "known" in outcomes[0].error
    assert len(caplog.records) == 1 and caplog.records[0].job_id == 0
    monkeypatch.setattr(executor, "UNKNOWN_LOG_EVERY", 0.0)
    with caplog.at_level(logging.WARNING, "jobqd.execute"):
        run(job("reports.user-500", 500))
    assert "500 job(s) of unknown tasks released" in caplog.records[-1].getMessage()


def test_test_helpers_end_an_unknown_task_dead_at_once():
    outcome = Executor(Registry(), Policy()).run(job("nope"))
    assert outcome.state == DEAD and "unknown task 'nope'" in outcome.error


def test_a_task_name_that_looks_like_a_module_is_never_imported():
    names = [name for name in ("json.tool", "xml.dom.minidom") if name not in sys.modules]
    assert names, "the modules are already imported: pick others"
    run = Executor(Registry(), Policy(release_unknown=True)).run
    outcomes = [run(job(f"{name}.main")) for name in names]
    assert {o.state for o in outcomes} == {UNHANDLED}
    assert [name for name in names if name in sys.modules] == []

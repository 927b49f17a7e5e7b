"""Task registry, routing, middleware, backoff and the executor's decisions (no database)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from jobqd.backoff import Backoff
from jobqd.tasks import Job, JobCancelled, Registry, import_modules, middleware, task
from jobqd.worker.executor import Executor, Policy


def make_job(task_name: str, attempt: int = 1, max_attempts: int = 5, **kw) -> Job:
    return Job(id=1, queue="q", task=task_name, attempt=attempt, max_attempts=max_attempts, **kw)


def test_prefix_routes_pick_the_longest_match_and_exact_names_win():
    reg = Registry()
    task("reports.*", registry=reg)(lambda job: "any report")
    task("reports.daily.*", registry=reg)(lambda job: "daily")
    task("reports.daily.sales", registry=reg)(lambda job: "sales")
    assert reg.get("reports.weekly").fn(None) == "any report"
    assert reg.get("reports.daily.ops").fn(None) == "daily"
    assert reg.get("reports.daily.sales").fn(None) == "sales"
    assert reg.get("other") is None
    assert reg.names() == ["reports.*", "reports.daily.*", "reports.daily.sales"]


def test_middleware_wraps_every_job_in_registration_order():
    reg = Registry()
    seen: list[str] = []

    def outer(job, call_next):
        seen.append("outer in")
        result = call_next()
        seen.append("outer out")
        return {"wrapped": result}

    def inner(job, call_next):
        seen.append(f"inner {job.id}")
        return call_next()

    middleware(outer, registry=reg)
    middleware(inner, registry=reg)
    task("t", registry=reg)(lambda job: seen.append("task") or 7)
    outcome = Executor(reg, Policy()).run(make_job("t"))
    assert seen == ["outer in", "inner 1", "task", "outer out"]
    assert outcome.state == "succeeded" and outcome.result == '{"wrapped": 7}'


def test_async_tasks_run_on_the_worker_event_loop():
    reg = Registry()

    @task("a", registry=reg)
    async def a(job):
        await asyncio.sleep(0)
        return job.args["n"] + 1

    outcome = Executor(reg, Policy()).run(make_job("a", args={"n": 1}))
    assert outcome.result == "2"


def test_exponential_backoff_grows_caps_and_jitters():
    plain = Backoff(base=1, cap=60, jitter=0)
    assert [plain.delay(n) for n in (1, 2, 3, 4, 10)] == [1, 2, 4, 8, 60]
    jittered = [Backoff(base=10, cap=1000, jitter=0.2).delay(3) for _ in range(200)]
    assert all(32 <= d <= 48 for d in jittered) and len(set(jittered)) > 100
    assert Backoff(kind="fixed", base=5, jitter=0).delay(9) == 5


def test_task_backoff_beats_queue_backoff_and_last_attempt_is_dead():
    reg = Registry()

    @task("custom", registry=reg, backoff=lambda attempt: attempt * 100.0)
    def custom(job):
        raise RuntimeError("no")

    ex = Executor(reg, Policy(backoff=Backoff(base=1, jitter=0)))
    assert ex.run(make_job("custom", attempt=2)).delay == 200.0
    last = ex.run(make_job("custom", attempt=5, max_attempts=5))
    assert last.state == "dead" and last.delay is None


def test_job_cancellation_flag_and_check():
    job = make_job("t")
    assert not job.cancelled
    job.check()
    job.cancel("soft timeout")
    job.cancel("later reason is ignored")
    assert job.cancelled and job.cancel_reason == "soft timeout"
    with pytest.raises(JobCancelled, match="soft timeout"):
        job.check()


def test_args_are_parsed_lazily_from_json():
    job = make_job("t", args_json='{"a": [1, 2]}', created_at=0.0)
    assert job.args == {"a": [1, 2]}
    assert job.created_at.year == 1970


def test_results_that_are_not_json_are_kept_as_their_repr():
    reg = Registry()
    task("obj", registry=reg)(lambda job: {1, 2})
    assert Executor(reg, Policy()).run(make_job("obj")).result == '"{1, 2}"'


@pytest.fixture
def clean_imports(monkeypatch):
    """import_modules changes sys.path and sys.modules: both are put back after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_imports_are_found_in_the_given_path_first(tmp_path, clean_imports):
    (tmp_path / "firsthour_app").mkdir()
    (tmp_path / "firsthour_app" / "__init__.py").write_text("")
    (tmp_path / "firsthour_app" / "jobs.py").write_text("VALUE = 42\n")
    import_modules(["firsthour_app.jobs"], (str(tmp_path),))
    assert sys.modules["firsthour_app.jobs"].VALUE == 42
    assert sys.path[0] == str(tmp_path)


def test_a_missing_module_says_where_it_looked_and_what_to_do(tmp_path, clean_imports):
    with pytest.raises(ImportError) as caught:
        import_modules(["firsthour_nowhere.tasks"], (str(tmp_path / "src"), str(tmp_path)))
    assert str(caught.value) == (
        "cannot import 'firsthour_nowhere.tasks' (from imports:): no module named "
        f"'firsthour_nowhere'; looked in {tmp_path}/src, {tmp_path} and the packages installed "
        f"for {sys.executable}. Set pythonpath: in the config to the directory that holds "
        "'firsthour_nowhere', run jobqd from that directory, or pip install your project into "
        "that Python"
    )


def test_a_module_that_fails_says_why_and_where(tmp_path, clean_imports):
    (tmp_path / "firsthour_needs.py").write_text("import firsthour_not_installed\n")
    (tmp_path / "firsthour_broken.py").write_text("X = 1\nY = 1 / 0\n")
    with pytest.raises(ImportError) as caught:
        import_modules(["firsthour_needs"], (str(tmp_path),))
    assert str(caught.value) == (
        "cannot import 'firsthour_needs' (from imports:): it imports 'firsthour_not_installed', "
        f"which is not installed for {sys.executable}: pip install it there"
    )
    with pytest.raises(ImportError) as caught:
        import_modules(["firsthour_broken"], (str(tmp_path),))
    assert str(caught.value) == (
        "cannot import 'firsthour_broken' (from imports:): ZeroDivisionError: division by zero "
        f"(at {tmp_path}/firsthour_broken.py:2)"
    )

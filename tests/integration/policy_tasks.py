"""Tasks of a newer deploy, for the policy tests: a worker that imports this module knows them,
one that imports only `helpers` does not."""

from __future__ import annotations

import time

from helpers import record

from jobqd.tasks import Job, task


@task("policy.new")
def new_task(job: Job) -> None:
    record(job)


@task("rx.*", delivery="at_most_once")
def at_most_once_route(job: Job) -> None:
    """Records that it started, then sleeps `seconds`: a job that must never run twice."""
    record(job)
    deadline = time.monotonic() + job.args.get("seconds", 60)
    while time.monotonic() < deadline and not job.cancelled:
        time.sleep(0.02)

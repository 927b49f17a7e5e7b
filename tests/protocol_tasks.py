"""The Python twin of examples/node-sql's `example.work`, so Python and Node workers can share
one queue in tests/e2e/test_node_worker.py: the same arguments, the same ledger rows."""

from __future__ import annotations

import time

from helpers import record

from jobqd.tasks import Job, Snooze, task


@task("example.work", queue="shared")
def work(job: Job) -> None:
    """{"ms": how long, "fail_once": fail attempt 1, "not_before": snooze until this Unix time}."""
    not_before = job.args.get("not_before")
    if not_before and time.time() < not_before:
        raise Snooze(not_before - time.time())
    record(job)
    time.sleep(job.args.get("ms", 0) / 1000)
    if job.args.get("fail_once") and job.attempt == 1:
        raise ValueError("failing the first attempt, as asked")

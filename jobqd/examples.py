"""Example tasks for a first run: `imports: [jobqd.examples]` registers them.

This module is also the tasks.py that `jobqd --init DIR` writes, its name replaced by `tasks`
throughout (so name it in full everywhere), without this paragraph.

Try them once the daemon runs (SQL from `jobqctl psql`):

    jobqctl enqueue send_welcome --args '{"user_id": 7}'
    select jobqd.enqueue('default', 'jobqd.examples.tick', '{"hello": "world"}');
    select jobqd.enqueue('default', 'jobqd.examples.sleep', '{"seconds": 5}');
    select jobqd.enqueue('default', 'jobqd.examples.fail', '{"message": "boom"}',
                         max_attempts => 2);
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from jobqd import Job, task

log = logging.getLogger("jobqd.examples")


@task("send_welcome", queue="emails")
def send_welcome(job: Job) -> dict[str, Any]:
    """Stand-in for a mailer: logs the welcome mail it would send to `args.user_id`. Its jobs
    go to the `emails` queue unless the caller names another."""
    user_id = job.args.get("user_id")
    log.info(
        "welcome mail for user %s (an example: nothing is sent)", user_id, extra=job.log_fields()
    )
    return {"sent_to": user_id}


@task("jobqd.examples.tick")
def tick(job: Job) -> dict[str, Any]:
    """Log one line with the job's args; the result says when it ran."""
    log.info("tick %s", json.dumps(job.args), extra=job.log_fields())
    return {"ticked_at": datetime.now(UTC).isoformat(), "args": job.args}


@task("jobqd.examples.sleep")
def sleep(job: Job) -> dict[str, float]:
    """Sleep `args.seconds` (default 1), stopping early when the job is cancelled (cancel,
    timeout, shutdown past the deadline): how a long task cooperates."""
    seconds = float(job.args.get("seconds", 1))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job.check()  # raises JobCancelled once the job is cancelled
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    return {"slept": seconds}


@task("jobqd.examples.fail")
def fail(job: Job) -> None:
    """Always raise, to watch retries with backoff and then a dead job."""
    raise RuntimeError(job.args.get("message", "this task always fails"))

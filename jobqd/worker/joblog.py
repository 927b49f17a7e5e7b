"""The log lines about a job's life that a person follows: started, and how it ended.

Start and success lines are at debug, or at info for a queue with `log_jobs: true`; whether
they are wanted is asked once per batch (`wanted`), so a queue that does not log them pays
one level check per claim and per write, not a formatted record per job. A retry or snooze is
always one line at info and a death one at warning, with the reason (never the payload):
those are what someone looks for afterwards. Every line carries the job's id, queue, task
and attempt, `event` and, for an end, `outcome` and `duration` (seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from jobqd.config.durations import format_duration
from jobqd.tasks import Job
from jobqd.worker.executor import DEAD, QUEUED, SUCCEEDED, Outcome

log = logging.getLogger("jobqd.jobs")


class JobLog:
    """One queue's job lines: `log_jobs` moves start and success lines from debug to info."""

    def __init__(self, log_jobs: bool = False) -> None:
        self.level = logging.INFO if log_jobs else logging.DEBUG

    def wanted(self) -> bool:
        """Whether start and success lines would be written now: ask once per batch."""
        return log.isEnabledFor(self.level)

    def started(self, jobs: Iterable[Job]) -> None:
        """A claimed batch handed to the slots."""
        if not self.wanted():
            return
        for job in jobs:
            log.log(self.level, "started", extra={**job.log_fields(), "event": "job_started"})

    def ended(self, outcome: Outcome, wanted: bool) -> None:
        """One written outcome; `wanted` is this batch's answer from `wanted()`."""
        state, job = outcome.state, outcome.job
        if state == SUCCEEDED and not wanted:
            return
        fields = {
            **job.log_fields(),
            "event": "job_ended",
            "duration": round(outcome.duration, 6),
        }
        took = format_duration(round(outcome.duration, 4))
        reason = outcome.reason or "no reason given"
        if state == SUCCEEDED:
            fields["outcome"] = "succeeded"
            log.log(self.level, "succeeded in %s", took, extra=fields)
        elif state == QUEUED and outcome.snooze:
            fields["outcome"] = "snoozed"
            after = format_duration(round(outcome.delay or 0.0, 3))
            log.info("snoozed for %s after %s", after, took, extra=fields)
        elif state == QUEUED:
            fields["outcome"] = "retried"
            after = format_duration(round(outcome.delay or 0.0, 3))
            log.info("failed after %s, retrying in %s: %s", took, after, reason, extra=fields)
        elif state == DEAD:
            fields["outcome"] = "dead"
            log.warning(
                "dead after %s (attempt %d of %d): %s",
                took,
                job.attempt,
                job.max_attempts,
                reason,
                extra=fields,
            )

"""jobqd: a Postgres-backed job queue daemon for Python."""

from jobqd.client import BundleInfo, Client, JobInfo
from jobqd.tasks import Discard, Job, JobCancelled, Retry, Snooze, middleware, task

__all__ = [
    "BundleInfo",
    "Client",
    "Discard",
    "Job",
    "JobCancelled",
    "JobInfo",
    "Retry",
    "Snooze",
    "middleware",
    "task",
]
__version__ = "0.1.0"

"""jobqd: a Postgres-backed job queue daemon for Python."""

from importlib import metadata

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

try:  # pyproject.toml's version is the only one: read it from the installed metadata
    __version__ = metadata.version("jobqd")
except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

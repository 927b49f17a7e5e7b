"""The health file: the master's sign of life for health checks that cannot use /healthz.

A container's HEALTHCHECK runs inside the container whatever config the user mounted, and
that config may not set http.listen. So when JOBQD_HEALTH_FILE names a path (the image sets
it), the master rewrites that file from its loop, at most every `EVERY` seconds, with its pid
and status, and removes it when it stops. `jobqd --health` reads it: healthy while the file
is fresh and its pid alive, so a master that died, hangs or stopped is reported as such.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "JOBQD_HEALTH_FILE"
EVERY = 2.0
"""Seconds between rewrites; the master's loop turns at least every 5 s (MAX_WAIT)."""
MAX_AGE = 30.0
"""A file older than this means the master's loop stopped turning: unhealthy."""


class HealthFile:
    """The master's side: `beat()` from every loop turn, `remove()` when it stops."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next = 0.0

    @classmethod
    def from_environment(cls) -> HealthFile | None:
        path = os.environ.get(ENV)
        return cls(Path(path)) if path else None

    def beat(self, now: float, status: str) -> None:
        """Rewrite the file (atomically) if the last write is `EVERY` seconds old; a failed
        write is retried on the next turn and never stops the master."""
        if now < self._next:
            return
        self._next = now + EVERY
        document = {"pid": os.getpid(), "status": status, "written": time.time()}
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            partial.write_text(json.dumps(document), encoding="utf-8")
            os.replace(partial, self.path)
        except OSError:
            self._next = now

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    message: str


def check(path: Path, max_age: float = MAX_AGE, now: float | None = None) -> Verdict:
    """Whether the master that writes `path` is alive and turning its loop."""
    try:
        stat = path.stat()
        document = json.loads(path.read_text(encoding="utf-8"))
        pid, status = int(document["pid"]), str(document["status"])
    except FileNotFoundError:
        return Verdict(False, f"no health file {path}: jobqd is not running (or stopped)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verdict(False, f"cannot read the health file {path}: {exc}")
    age = (time.time() if now is None else now) - stat.st_mtime
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return Verdict(False, f"the master (pid {pid}) is gone; {path} is {age:.0f}s old")
    except PermissionError:
        pass  # alive, another user's: the age says whether it is turning
    if age > max_age:
        return Verdict(False, f"the master (pid {pid}) has been silent for {age:.0f}s")
    return Verdict(True, f"ok: master pid {pid}, {status or 'starting'}, {age:.0f}s ago")

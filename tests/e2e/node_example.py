"""An example worker of examples/ run the way its README says (`node main.js`), for the e2e
tests of the SQL and the HTTP protocol: its JSON log in a file, read back as records."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


class NodeExample:
    """`node main.js` in `directory` with `env` on top of this environment; stdout and stderr
    go to `log`, one JSON object per line."""

    def __init__(self, directory: Path, name: str, log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["node", "main.js"],
                cwd=directory,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def events(self, event: str | None = None, path: Path | None = None) -> list[dict]:
        """The JSON lines of `path` (default: the log) whose `event` is `event` (None: all);
        lines that are not JSON (a crash's stack trace) are skipped."""
        path = path or self.log
        if not path.exists():
            return []
        found = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if event is None or record.get("event") == event:
                found.append(record)
        return found

    def stop(self, lines: int = 30) -> None:
        """SIGKILL if still running, then print the log's tail for a failing test's report."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        print(f"--- {self.name} log (last lines) ---")
        print("\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]))

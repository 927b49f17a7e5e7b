"""The health file's verdicts that need no daemon: a master that was SIGKILLed leaves its file
behind, and the pid in it, gone, is what tells; no file at all means stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobqd.observe import healthfile


def test_a_killed_master_is_unhealthy(tmp_path: Path) -> None:
    """SIGKILL leaves the file behind: the pid in it, gone, is what tells."""
    path = tmp_path / "health"
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(exited.stdout)
    healthfile.HealthFile(path).beat(0.0, "ready")
    path.write_text(path.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {pid}'))
    verdict = healthfile.check(path)
    assert not verdict.healthy
    assert verdict.message.startswith(f"the master (pid {pid}) is gone; ")
    assert healthfile.check(path.with_name("missing")).message.startswith("no health file ")

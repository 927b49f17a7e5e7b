"""Never to be imported by a worker: a job whose task is named `policy_import_trap.run` must be
looked up in the registry, not imported. Importing it writes the file JOBQD_TEST_TRAP names."""

from __future__ import annotations

import os
from pathlib import Path

Path(os.environ["JOBQD_TEST_TRAP"]).write_text(f"imported by pid {os.getpid()}\n")


def run(job: object) -> None:
    raise AssertionError("a task name was imported and run")

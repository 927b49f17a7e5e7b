"""What Linux says about a process in /proc/PID/stat: resident memory, CPU time, start time.

The http child reads this for the master and every child at each scrape, so the children
spend nothing on measuring themselves. One small file read per process; the start time is
turned into Unix time with CLOCK_BOOTTIME rather than /proc/stat's btime, which a unit with
`ProcSubset=pid` hides.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcessStat:
    rss_bytes: int
    cpu_seconds: float  # user + system
    started_at: float  # Unix time


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read(pid: int) -> ProcessStat | None:
    """The process's figures, or None when it is gone or this is not Linux."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        utime, stime = int(fields[11]), int(fields[12])
        start_ticks, rss_pages = int(fields[19]), int(fields[21])
    except (IndexError, ValueError):
        return None
    since_boot = start_ticks / _TICKS
    started_at = time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    return ProcessStat(rss_pages * _PAGE, (utime + stime) / _TICKS, started_at)

import os
import subprocess
import sys
import time

from jobqd.observe import procstat


def test_a_fresh_process_started_now_and_uses_memory():
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        stat = None
        deadline = time.monotonic() + 10
        while stat is None or stat.rss_bytes < 4 << 20:  # until the interpreter is up
            stat = procstat.read(child.pid)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Ticks are 1/100 s and the clock read twice: a little slack either side.
        assert before - 0.05 <= stat.started_at <= time.time() + 0.05
        assert stat.cpu_seconds >= 0
    finally:
        child.kill()
        child.wait()


def test_this_process_has_spent_cpu_and_a_gone_one_reads_as_none():
    sum(range(3_000_000))
    mine = procstat.read(os.getpid())
    assert mine is not None and mine.cpu_seconds > 0 and mine.started_at < time.time()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert procstat.read(child.pid) is None

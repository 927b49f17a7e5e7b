"""Fixtures for tests that spawn daemon processes against the per-test database."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator

import psycopg
import pytest
from helpers import LEDGER_TABLE


@pytest.fixture
def db(dsn: str, conn: psycopg.Connection) -> str:
    """`dsn`, with the ledger table that the test tasks record their runs in."""
    conn.execute(LEDGER_TABLE)
    return dsn


@pytest.fixture
def procs() -> Iterator[list[multiprocessing.Process]]:
    """Processes a test spawned; whatever is still alive at the end is killed (and resumed
    first, in case the test stopped it)."""
    started: list[multiprocessing.Process] = []
    yield started
    for proc in started:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.join(5)


@pytest.fixture
def workers(procs: list[multiprocessing.Process]) -> list[multiprocessing.Process]:
    """Worker processes a test spawned: the same list, and teardown, as `procs`."""
    return procs

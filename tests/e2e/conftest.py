"""Fixtures for the daemon e2e tests: a ledger table and `jobqd(config)` to start daemons that
are stopped (and whose leftovers are killed) when the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from e2e_daemon import Daemon, base_config, daemon_env
from helpers import LEDGER_TABLE


@pytest.fixture
def ledger(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LEDGER_TABLE)
    return dsn


@pytest.fixture
def jobqd(tmp_path: Path, ledger: str) -> Iterator[Callable[..., Daemon]]:
    """`jobqd(config, env={...})` writes the config and starts a daemon on this test's database."""
    started: list[Daemon] = []

    def start(
        config: dict[str, Any] | str | None = None,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> Daemon:
        daemon = Daemon(tmp_path, ledger, {**daemon_env(ledger, tmp_path), **(env or {})})
        daemon.write_config(base_config(ledger) if config is None else config)
        started.append(daemon)
        return daemon.start(*args)

    yield start
    for daemon in started:
        daemon.stop()
        print(f"--- daemon log (last lines) ---\n{daemon.tail()}")


@pytest.fixture
def nodes(tmp_path: Path, ledger: str) -> Iterator[Callable[[dict[str, Any]], Daemon]]:
    """`nodes(config)` starts a daemon in a directory of its own: several can share a database."""
    started: list[Daemon] = []

    def start(config: dict[str, Any]) -> Daemon:
        home = tmp_path / f"node{len(started)}"
        home.mkdir()
        daemon = Daemon(home, ledger, daemon_env(ledger, home))
        daemon.write_config(config)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()
        print(f"--- {daemon.dir.name} log (last lines) ---\n{daemon.tail()}")

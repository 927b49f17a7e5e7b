"""`jobqctl roll` and `jobqctl status` about rolls, against processes rows as daemons write
them (the daemon itself rolls in tests/e2e/test_rolling.py)."""

from __future__ import annotations

import json
import os
import socket

import psycopg

from jobqd.cli import ctl


def register(conn: psycopg.Connection, host: str, pid: int, role: str, **metadata) -> None:
    conn.execute(
        "INSERT INTO jobqd.processes (host, pid, role, queue, metadata)"
        " VALUES (%s, %s, %s, %s, %s)",
        (host, pid, role, "default" if role == "worker" else None, json.dumps(metadata)),
    )


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = ctl.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_roll_without_a_master_on_this_host_says_where_to_run_it(dsn, conn, capsys):
    register(conn, "elsewhere", 4120, "worker", master_pid=4100, generation=0)
    register(conn, socket.gethostname(), os.getpid(), "worker")  # its parent is no master
    code, out, err = run(capsys, "--dsn", dsn, "roll")
    assert code == 1 and out == ""
    assert err == (
        f"jobqctl: no jobqd master of this database runs on {socket.gethostname()}: jobqctl "
        "roll signals the masters on its own host, so run it on each node (e.g. `ssh NODE "
        "jobqctl roll`)\n"
    )


def test_status_shows_a_roll_under_way_a_stopped_one_and_workers_of_two_rolls(dsn, conn, capsys):
    register(conn, "app1", 11, "worker", master_pid=10, generation=2)
    register(conn, "app1", 12, "worker", master_pid=10, generation=1)
    roll = {"number": 2, "state": "rolling", "replaced": 1, "total": 2}
    register(
        conn,
        "app1",
        13,
        "http",
        master_pid=10,
        generation=0,
        roll=roll | {"replacing": ["worker default#1"], "where": None, "error": None},
    )
    register(conn, "app2", 21, "worker", master_pid=20, generation=3)
    register(conn, "app2", 22, "worker", master_pid=20, generation=0)
    register(conn, "app3", 31, "worker", master_pid=30, generation=1)
    register(conn, "app3", 32, "worker", master_pid=30, generation=0)
    failed = {"number": 1, "state": "failed", "replaced": 1, "total": 2, "replacing": []}
    error = "the replacement for worker default#1 exited before it booted: exit status 1"
    register(conn, "app3", 33, "http", master_pid=30, roll=failed | {"error": error})
    register(conn, "app4", 41, "worker", master_pid=40, generation=5)  # one roll: nothing
    register(conn, "app4", 42, "worker", master_pid=40, generation=5)

    code, out, _ = run(capsys, "--dsn", dsn, "status")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("roll:")]
    assert lines == [
        "roll: app1 master 10: roll 2 rolling, 1/2 workers replaced (replacing: worker default#1)",
        "roll: app2 master 20: 1 worker(s) run roll 3's code, 1 earlier code (a roll is under "
        "way or stopped: see that node's log)",
        f"roll: app3 master 30: roll 1 stopped: {error}; 1 worker(s) still run earlier code: "
        "fix it and `jobqctl roll` again on that host",
    ]
    code, out, _ = run(capsys, "--dsn", dsn, "--json", "status")
    rolls = json.loads(out)["rolls"]
    assert [(r["host"], r["master_pid"], r["workers"]) for r in rolls] == [
        ("app1", 10, {"2": 1, "1": 1}),
        ("app2", 20, {"3": 1, "0": 1}),
        ("app3", 30, {"1": 1, "0": 1}),
    ]
    assert rolls[2]["roll"]["error"] == error

"""The chaos soak (issue 10): two daemons x two worker processes on one queue, on a throw-away
PostgreSQL cluster, with a fault every few seconds; then a drain and the checks.

    python bench/chaos.py --jobs 20000 --duration 300     # the soak
    python bench/chaos.py --short                         # about 2 minutes, for CI

Daemon `a` reaches the database through a fault proxy, daemon `b` directly. Jobs are enqueued
at a steady rate over the first 70% of the run; each is the `faults.run` ledger task
(tests/runs.py: job id, attempt, pid, start and end, written by the task). Faults, drawn at
random every 3-6 s: SIGKILL a child; SIGKILL a master and start it again; pg_terminate_backend
a random jobqd session; SIGSTOP a child for longer than its lease, then SIGCONT. Scheduled
once each: a 20 s blackhole of the proxy (one per 150 s of run), a `fast` and an `immediate`
Postgres restart. A sampler reads who holds the leader lock (pg_locks) and which maintenance
processes call themselves leader (process titles) twice a second.

At the end it waits for the queue to drain (a progress line every 5 s) and checks, against the
ledger and the jobs table: jobs lost, overlapping runs of one job while a lease was valid,
runs not explained by an attempt, anything left running, at most one leader per sample, and
effects that happened twice, each put down to its cause (runs.cause): a lease already lost
when the task ended (frozen or cut off past it), or the fault that hit its process as it
ended; one that only a master kill explains, or nothing does, breaks the run. Resume times
(first run started per daemon after a restart or a heal) come from the ledger. It prints a
summary and writes it as JSON (--out); --keep DIR keeps the ledger and daemon logs. Exit
status 1 when an invariant was broken, 0 otherwise. All traffic stays on 127.0.0.1; the
cluster's data lives in a temp dir that is always removed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

import psycopg  # noqa: E402
from e2e_daemon import Daemon, alive, base_config, title  # noqa: E402
from faults import Cluster, Freezer, Proxy, cluster_unavailable, launch, send  # noqa: E402
from runs import RUNS_DIR_ENV, Fault, Run, audit, read_runs  # noqa: E402

from jobqd.store.migrate import lock_key, migrate  # noqa: E402

QUEUE, SCHEMA = "chaos", "jobqd"
LEASE = 6.0
PROFILES = {"short": {"jobs": 3000, "duration": 90.0}}
RANDOM_FAULTS = ("kill_child", "kill_master", "terminate_session", "stop_child")


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def daemon_config(dsn: str) -> dict[str, Any]:
    config = base_config(dsn)
    config["imports"] = ["helpers", "runs"]
    config["queues"] = {
        QUEUE: {"processes": 2, "concurrency": 8, "lease": f"{LEASE:g}s", "max_attempts": 50}
    }
    config["maintenance"] = {"interval": "200ms", "standby_retry": "500ms"}
    return config


def direct(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=2, application_name="chaos")


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path, pg: Cluster, proxy: Proxy) -> None:
        self.args, self.work, self.pg, self.proxy = args, work, pg, proxy
        self.dsn = pg.dsn()
        self.rng = random.Random(args.seed)
        self.runs_dir = work / "runs"
        self.runs_dir.mkdir()
        self.daemons: dict[str, Daemon] = {}
        self.freezer = Freezer()
        self.ids: list[int] = []
        self.enqueue_errors = 0
        self.faults: list[dict[str, Any]] = []
        self.hits: list[Fault] = []  # what each fault may have cost, for the audit
        self.killed_pids: set[int] = set()
        self.blackholed_at = 0.0
        self.returns: list[dict[str, Any]] = []  # when the database or the link came back
        self.samples = Counter()
        self.max_lock_holders = 0
        self.stop = threading.Event()
        self.began = time.monotonic()
        self.began_at = time.time()

    # -- the moving parts --------------------------------------------------------------------

    def start_daemons(self) -> None:
        for name, dsn in (("a", self.proxy.dsn(self.dsn)), ("b", self.dsn)):
            self.daemons[name] = launch(
                self.work / name,
                dsn,
                daemon_config(dsn),
                ledger_dsn=self.dsn,
                env={RUNS_DIR_ENV: str(self.runs_dir)},
            )
        for daemon in self.daemons.values():
            for slot in (0, 1):
                daemon.booted(f"worker {QUEUE}#{slot}")

    def enqueue(self) -> None:
        """Enqueue at a steady rate over the first 70% of the run; 1% of the jobs outlast the
        lease, so a frozen or cut-off worker holds some long ones."""
        span = self.args.duration * 0.7
        done = 0
        conn: psycopg.Connection | None = None
        while done < self.args.jobs and not self.stop.is_set():
            due = min(self.args.jobs, int(self.args.jobs * (time.monotonic() - self.began) / span))
            batch = min(due - done, 500)
            if batch <= 0:
                self.stop.wait(0.2)
                continue
            try:
                if conn is None or conn.closed:
                    conn = direct(self.dsn)
                rows = conn.execute(
                    "SELECT jobqd.enqueue(%s, 'faults.run', jsonb_build_object('seconds',"
                    " CASE WHEN random() < 0.01 THEN %s ELSE 0.02 + random() * 0.18 END))"
                    " FROM generate_series(1, %s)",
                    (QUEUE, LEASE * 1.5, batch),
                ).fetchall()
            except psycopg.Error:
                self.enqueue_errors += 1
                if conn is not None:
                    conn.close()
                self.stop.wait(0.5)
                continue
            self.ids.extend(row[0] for row in rows)
            done += batch
        if conn is not None:
            conn.close()

    def leaders(self) -> list[int]:
        return [
            pid
            for daemon in self.daemons.values()
            for pid, text in daemon.children().items()
            if text.startswith("jobqd: maintenance leader")
        ]

    def sample(self) -> None:
        """Twice a second: holders of the leader lock (pg_locks) and self-declared leaders."""
        key = lock_key(SCHEMA, "leader")
        parts = ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)
        conn: psycopg.Connection | None = None
        while not self.stop.wait(0.5):
            self.samples["taken"] += 1
            if len(self.leaders()) > 1:
                self.samples["two_titled_leaders"] += 1
            try:
                if conn is None or conn.closed:
                    conn = direct(self.dsn)
                holders = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND objsubid = 1 AND classid::bigint = %s AND objid::bigint = %s",
                    parts,
                ).fetchone()[0]
            except psycopg.Error:
                self.samples["database_down"] += 1
                if conn is not None:
                    conn.close()
                continue
            self.max_lock_holders = max(self.max_lock_holders, holders)
            if holders > 1:
                self.samples["two_lock_holders"] += 1
            if holders == 0:
                self.samples["no_leader"] += 1
        if conn is not None:
            conn.close()

    def children(self, prefix: str) -> list[tuple[str, int]]:
        return [
            (name, pid)
            for name, daemon in self.daemons.items()
            for pid, text in daemon.children().items()
            if text.startswith(f"jobqd: {prefix}") and pid not in self.freezer.frozen
        ]

    # -- faults ------------------------------------------------------------------------------

    def record(self, kind: str, **detail: Any) -> None:
        at = round(time.monotonic() - self.began, 1)
        self.faults.append({"kind": kind, "at": at, **detail})
        log(f"{at:6.1f}s {kind} {detail}")

    def kill_child(self) -> None:
        targets = self.children("worker ") + self.children("maintenance")
        if targets:
            name, pid = self.rng.choice(targets)
            detail = title(pid)
            if send(pid, signal.SIGKILL):
                now = time.time()
                self.killed_pids.add(pid)
                # outcomes finished in the last second may not have been written yet
                self.hits.append(Fault("kill_child", now - 1, now, pid=pid))
                self.record("kill_child", daemon=name, pid=pid, title=detail)

    def kill_master(self) -> None:
        name = self.rng.choice(sorted(self.daemons))
        daemon = self.daemons[name]
        daemon.children()  # remember its children, to clean up after them
        if send(daemon.pid, signal.SIGKILL):
            now = time.time()
            # its children drain for up to shutdown_timeout (10 s), then exit
            self.hits.append(Fault("kill_master", now - 2, now + 15, daemon=name))
            self.killed_pids.add(daemon.pid)
            daemon.wait(10)
            self.record("kill_master", daemon=name, pid=daemon.pid)
        self.stop.wait(1)
        daemon.start()

    def terminate_session(self) -> None:
        try:
            with direct(self.dsn) as conn:
                row = conn.execute(
                    "SELECT pid, application_name, pg_terminate_backend(pid) FROM ("
                    " SELECT pid, application_name FROM pg_stat_activity"
                    " WHERE application_name LIKE 'jobqd%%' ORDER BY random() LIMIT 1) s"
                ).fetchone()
        except psycopg.Error as exc:
            log(f"terminate_session skipped: {exc}")
            return
        if row:
            self.record("terminate_session", backend=row[0], application_name=row[1])

    def stop_child(self) -> None:
        targets = self.children("worker ") + self.children("maintenance")
        if targets:
            name, pid = self.rng.choice(targets)
            seconds = LEASE + 3
            detail = title(pid)
            if self.freezer.freeze(pid, seconds):
                now = time.time()
                # what it finishes just after SIGCONT comes past its lease
                self.hits.append(Fault("stop_child", now - 1, now + seconds + 2, pid=pid))
                self.record("stop_child", daemon=name, pid=pid, title=detail, seconds=seconds)

    def blackhole(self, seconds: float = 20.0) -> None:
        self.blackholed_at = time.time()
        self.proxy.blackhole()
        self.record("blackhole", seconds=seconds)
        timer = threading.Timer(seconds, self.heal)
        timer.daemon = True
        timer.start()

    def heal(self) -> None:
        self.proxy.heal()
        now = time.time()
        self.hits.append(Fault("blackhole", self.blackholed_at - 1, now, daemon="a"))
        self.returns.append({"after": "blackhole", "at": now, "daemons": ["a"]})

    def restart_postgres(self, mode: str) -> None:
        down = 5.0 if mode == "immediate" else 2.0
        kind, began = f"postgres_{mode}_restart", time.time()
        self.record(kind, down=down)
        self.pg.restart(mode, down=down)  # returns once the server accepts connections
        now = time.time()
        self.hits.append(Fault(kind, began - 1, now))
        self.returns.append({"after": kind, "at": now, "daemons": ["a", "b"]})

    def chaos(self) -> None:
        duration = self.args.duration
        scheduled = [(duration * 0.35, "fast"), (duration * 0.65, "immediate")]
        blackholes = max(1, int(duration // 150))
        scheduled += [
            (duration * (0.2 + 0.6 * n / blackholes), "blackhole") for n in range(blackholes)
        ]
        scheduled.sort()
        while not self.stop.wait(self.rng.uniform(3, 6)):
            elapsed = time.monotonic() - self.began
            if elapsed > duration or len(self.faults) >= self.args.max_faults:
                return
            # a restart waits for the link to heal, so each resume figure has one cause
            if scheduled and elapsed >= scheduled[0][0] and self.proxy.mode == "pass":
                _, what = scheduled.pop(0)
                if what == "blackhole":
                    self.blackhole()
                else:
                    self.restart_postgres(what)
                continue
            getattr(self, self.rng.choice(RANDOM_FAULTS))()

    # -- the end -----------------------------------------------------------------------------

    def drain(self) -> float:
        """Wait until none of our jobs is queued or running; returns the seconds it took."""
        began = time.monotonic()
        last: dict[str, int] = {}
        while time.monotonic() - began < self.args.drain_timeout:
            try:
                with direct(self.dsn) as conn:
                    last = dict(
                        conn.execute(
                            "SELECT state, count(*) FROM jobqd.jobs WHERE id = ANY(%s)"
                            " GROUP BY state",
                            (self.ids,),
                        ).fetchall()
                    )
            except psycopg.Error as exc:
                log(f"drain: database not answering ({exc})")
            pending = last.get("queued", 0) + last.get("running", 0)
            log(f"drain {time.monotonic() - began:5.0f}s: {last} ({pending} to go)")
            if last and not pending:
                break
            time.sleep(5)
        return round(time.monotonic() - began, 1)

    def ensure_masters(self) -> None:
        for daemon in self.daemons.values():
            if daemon.proc is not None and daemon.proc.poll() is not None:
                log(f"master of {daemon.dir.name} is gone (exit {daemon.proc.returncode}): start")
                daemon.start()

    def worker_exits(self) -> dict[str, int]:
        """Child exits the masters logged that no kill of ours caused, by how (a child the
        master killed after child_timeout, e.g. one we froze, counts)."""
        exits: Counter[str] = Counter()
        for daemon in self.daemons.values():
            for r in daemon.logs():
                message = r.get("message", "")
                if " exited" not in message or r.get("child_pid") in self.killed_pids:
                    continue
                if r.get("exit_status") == 0 or "crash-looping" in message:
                    continue
                how = message.split(": ", 1)[-1].split(";")[0]
                exits[f"{r.get('child_role', '?')}: {how}"] += 1
        return dict(exits)

    def child_pids(self) -> dict[int, str]:
        """Every child any master of each daemon logged as booted: pid -> daemon name."""
        return {
            r["child_pid"]: name
            for name, daemon in self.daemons.items()
            for r in daemon.logs()
            if r.get("message", "").endswith(" booted") and "child_pid" in r
        }

    def resumes(self, runs: list[Run]) -> list[dict[str, Any]]:
        """Per return of the database (restart) or the link (blackhole heal) and per daemon
        it cut off: seconds from that instant to the first run its workers started."""
        owner = self.child_pids()
        found = []
        for back in self.returns:
            entry = {"after": back["after"], "at_s": round(back["at"] - self.began_at, 1)}
            for name in back["daemons"]:
                first = next(
                    (r.start for r in runs if r.start >= back["at"] and owner.get(r.pid) == name),
                    None,
                )
                entry[name] = None if first is None else round(first - back["at"], 2)
            found.append(entry)
        return found

    def keep(self, where: Path) -> None:
        """Copy the ledger and the daemons' logs and configs to `where`, for a post-mortem."""
        where.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.runs_dir, where / "runs", dirs_exist_ok=True)
        for name, daemon in self.daemons.items():
            for path in (daemon.log_path, daemon.config_path):
                if path.exists():
                    shutil.copy(path, where / f"{name}-{path.name}")
        log(f"ledger and daemon logs kept in {where}")

    def shutdown(self) -> None:
        self.freezer.thaw_all()
        self.proxy.heal()
        for daemon in self.daemons.values():
            daemon.stop()
            for pid in daemon.seen_children:
                if alive(pid) and title(pid).startswith("jobqd:"):
                    send(pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of chaos")
    parser.add_argument("--short", action="store_true", help="the CI profile, about 2 minutes")
    parser.add_argument("--max-faults", type=int, default=None, help="default: duration / 3")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("chaos-result.json"))
    parser.add_argument(
        "--keep", type=Path, default=None, help="copy the ledger and daemon logs to this dir"
    )
    args = parser.parse_args()
    if args.short:
        for key, value in PROFILES["short"].items():
            setattr(args, key, value)
    args.max_faults = args.max_faults or int(args.duration // 3)
    args.seed = args.seed if args.seed is not None else random.randrange(2**32)
    if reason := cluster_unavailable():
        print(f"chaos: {reason}", file=sys.stderr)
        return 2

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    started = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="jobqd-chaos-") as tmp,
        Cluster(prefix="jobqd-chaos-pg-") as pg,
    ):
        pg.start()
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            migrate(conn, SCHEMA)
        with Proxy.to(pg.dsn()) as proxy:
            soak = Soak(args, Path(tmp), pg, proxy)
            log(
                f"seed {args.seed}: {args.jobs} jobs, {args.duration:g}s of chaos,"
                f" cluster on port {pg.port}"
            )
            try:
                soak.start_daemons()
                soak.began, soak.began_at = time.monotonic(), time.time()
                threads = [
                    threading.Thread(target=soak.enqueue, name="enqueue", daemon=True),
                    threading.Thread(target=soak.sample, name="sample", daemon=True),
                ]
                for thread in threads:
                    thread.start()
                soak.chaos()
                threads[0].join()
                soak.freezer.thaw_all()
                if proxy.mode == "blackhole":
                    soak.heal()
                soak.ensure_masters()
                chaos_seconds = round(time.monotonic() - soak.began, 1)
                drain_seconds = soak.drain()
                soak.stop.set()
                threads[1].join()
                checks = audit(
                    pg.dsn(), soak.ids, soak.runs_dir, faults=soak.hits, owner=soak.child_pids()
                )
                exits = soak.worker_exits()
                resumes = soak.resumes(read_runs(soak.runs_dir))
            except BaseException:
                for daemon in soak.daemons.values():
                    log(f"daemon {daemon.dir.name}, last lines of its log:\n{daemon.tail(40)}")
                raise
            finally:
                soak.stop.set()
                soak.shutdown()
                if args.keep is not None:
                    soak.keep(args.keep)
    result = summarize(args, soak, checks, exits, resumes, chaos_seconds, drain_seconds, started)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    log(f"written to {args.out}")
    return 0 if result["ok"] else 1


def summarize(
    args: argparse.Namespace,
    soak: Soak,
    checks: dict[str, Any],
    exits: dict[str, int],
    resumes: list[dict[str, Any]],
    chaos_seconds: float,
    drain_seconds: float,
    started: float,
) -> dict[str, Any]:
    broken = {
        "lost": checks["lost"],
        "left_running": checks["left_running"],
        "left_queued": checks["left_queued"],
        "overlaps_valid_lease": checks["overlaps_valid_lease"],
        "unexplained_runs": checks["unexplained_runs"],
        "doubled_after_master_kill": checks["doubled_after_master_kill"],
        "doubled_unexplained": checks["doubled_unexplained"],
        "samples_two_lock_holders": soak.samples["two_lock_holders"],
    }
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seed": args.seed,
        "profile": "short" if args.short else "custom",
        "jobs_requested": args.jobs,
        "enqueue_errors": soak.enqueue_errors,
        "chaos_seconds": chaos_seconds,
        "drain_seconds": drain_seconds,
        "faults": dict(Counter(f["kind"] for f in soak.faults)),
        "fault_log": soak.faults,
        "resumes": resumes,
        "unplanned_child_exits": exits,
        "leader_samples": dict(soak.samples),
        "max_lock_holders": soak.max_lock_holders,
        "checks": checks,
        "broken": {key: value for key, value in broken.items() if value},
        "ok": not any(broken.values()),
    }


def print_summary(result: dict[str, Any]) -> None:
    checks = result["checks"]
    rows = [
        ("jobs", checks["jobs"]),
        ("states", checks["states"]),
        ("faults injected", sum(result["faults"].values())),
        *((f"  {kind}", n) for kind, n in sorted(result["faults"].items())),
        ("chaos / drain (s)", f"{result['chaos_seconds']} / {result['drain_seconds']}"),
        *(
            (f"resumed after {r['after']} at {r['at_s']}s (s)", {k: r[k] for k in "ab" if k in r})
            for r in result["resumes"]
        ),
        ("lost", checks["lost"]),
        ("doubled (effect twice)", checks["doubled"]),
        *((f"  {why}", n) for why, n in sorted(checks["doubled_by_cause"].items())),
        ("  near a master kill, any cause", checks["doubled_near_master_kill"]),
        ("overlaps, lease valid", checks["overlaps_valid_lease"]),
        ("overlaps, any", checks["overlaps"]),
        ("runs / unexplained", f"{checks['runs']} / {checks['unexplained_runs']}"),
        ("attempts reused after a release", checks["attempts_reused_after_release"]),
        ("runs gave up / unended", f"{checks['runs_gave_up']} / {checks['runs_unended']}"),
        ("succeeded without effect", checks["succeeded_without_effect"]),
        ("left running / queued", f"{checks['left_running']} / {checks['left_queued']}"),
        ("unplanned child exits", sum(result["unplanned_child_exits"].values())),
        *((f"  {how}", n) for how, n in sorted(result["unplanned_child_exits"].items())),
        ("leader samples", result["leader_samples"]),
        ("max lock holders", result["max_lock_holders"]),
        ("verdict", "ok" if result["ok"] else f"BROKEN: {result['broken']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())

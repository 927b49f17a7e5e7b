"""The master process: binds http.listen, forks the children the config asks for, and then
only supervises them.

Start: the listening socket is bound first (a taken address fails the start, exit 1, before
anything runs), then the http child starts, at once, so /healthz answers while the database
is still away. Waiting for the database, refusing a transaction-mode pooler (exit 78) and
migrating run in a helper process (jobqd.daemon.prepare); its progress feeds /readyz and
STATUS=, and the workers and maintenance start when it reports success. A HUP is checked the
way `jobqd --check` checks (imports, tasks, cron) in a helper too, and applied only if that
passed. Helpers are what keep user code and database connections out of the master.

The master is single-threaded and holds no database connection once it forks. It sleeps in one
selector over the signal wake-up pipe (`signal.set_wakeup_fd`: handlers do nothing, the signal
number arrives as a byte) and one message pipe per child, for at most the time until its next
deadline. Each turn does its chores in a fixed order: handle signals, reap exited children,
read child messages, enforce stop deadlines, converge to the spec list (restart with backoff),
then talk to systemd and feed the http child.

Signals: TERM/INT drain (children get TERM, then QUIT after `shutdown_timeout`, then SIGKILL
`QUIT_GRACE` later); a second TERM/INT, or QUIT, stops fast (QUIT now, SIGKILL
`FAST_STOP_GRACE` later); HUP reloads the config file, replacing only the children whose
settings changed; USR2 rolls: reloads the same way, then replaces every worker, each beside
its replacement until that has booted (jobqd.daemon.roll).

Child -> master messages (jobqd.daemon.ipc, one JSON object per line):
  `booted {role, process_id?, queue?}` once the child is ready for work;
  `status {busy?, concurrency?, leader?, metrics?}` periodically; `metrics` is a
  `MetricStore.snapshot_delta()` merged into the master's totals, `leader` (maintenance) is a bool.

Master -> http child messages, on the pipe whose read end is the http child's `feed_fd`:
  every `FEED_INTERVAL` seconds (and right after the child starts) the whole state, so a lost
  or dropped message never matters and the child only keeps the latest of each kind:
  `{"kind": "metrics", "snapshot": <MetricStore.snapshot()>}` (load it into an empty
  MetricStore) and
  `{"kind": "health", "master_alive_at": <unix time>, "preparing": <why the workers are not
  started yet, "" once prepared>, "ready": bool, "stopping": bool, "status": <the STATUS=
  line>, "children": {<name>: {"role", "queue", "index", "pid", "booted", "started_at", "busy",
  "concurrency", "leader", "restarts", "crash_looping", "crash_loop", "last_exit"}}, "roll":
  <the last roll: jobqd.daemon.roll.Roll.document(), null before any>}` where `pid` is null
  for a child waiting to be restarted.

Deaths: how a child died (describe_exit, or `killed after child_timeout`) goes with a dead
worker's process id to the next worker of its queue, which releases its jobs naming it. A
spec crash-loops after CRASH_LOOP_AFTER exits in a row before booting, or as many within
CRASH_LOOP_WINDOW after booting (jobqd.daemon.children.Restarts).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import math
import os
import selectors
import signal
import socket
import time
from typing import Any

from jobqd import config
from jobqd.config.settings import HttpSettings
from jobqd.daemon import report
from jobqd.daemon.children import (
    HTTP,
    WORKER,
    Child,
    ChildSpec,
    Feed,
    Ident,
    Restarts,
    specs_for,
)
from jobqd.daemon.helper import Helper, start_helper
from jobqd.daemon.ipc import Booted, Message, Sender, Status, decode
from jobqd.daemon.lifecycle import (
    MASTER_SIGNALS,
    ChildContext,
    become_child,
    role_entry,
    run_and_exit,
)
from jobqd.daemon.prepare import MIGRATING, prepare, resolve_database
from jobqd.daemon.reload import ReloadPlan, plan_reload
from jobqd.daemon.roll import BOOT_TIMEOUT, ROLLING, Replacement, Roll, plan_roll
from jobqd.errors import EXIT_BOOT_FAILED, EXIT_FAILURE, EXIT_OK, EXIT_RECYCLE
from jobqd.observe import healthfile, sdnotify
from jobqd.observe.logs import setup_logging
from jobqd.observe.metrics import MetricStore, define_jobqd_metrics
from jobqd.observe.proctitle import set_title

log = logging.getLogger("jobqd.master")

QUIT_GRACE = 1.5
"""After a drain's QUIT, how long children get to release their jobs before SIGKILL."""
FAST_STOP_GRACE = 2.0
"""After a fast stop's QUIT, how long children get before SIGKILL."""
READY_TIMEOUT = 30.0
"""READY=1 is sent at the latest this long after the children were started."""
FEED_INTERVAL = 1.0
MAX_WAIT = 5.0
CHECK_TIMEOUT = 60.0
"""How long a reload's config check (imports, tasks, cron) may take before it counts as failed."""
PROGRESS_EVERY = 5.0
"""While migrating: seconds between progress lines, STATUS and EXTEND_TIMEOUT_USEC."""
MIGRATION_STEP = "migrating (or waiting for another node's)"
HUNG = "killed after child_timeout"
"""How a child the master killed for its silence died, in its jobs' errors."""
_FEED_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def describe_exit(status: int, *, killed_by_us: bool = False) -> tuple[str, dict[str, Any]]:
    """A wait status in words, and the log fields for it."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        text = f"killed by {name}"
        if signum == signal.SIGKILL and not killed_by_us:
            text += " (out of memory?)"
        return text, {"signal": name}
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    return f"exit status {code}", {"exit_status": code}


def installed_version() -> str | None:
    """The version of jobqd installed on disk now (None when it is not installed as a
    distribution): a roll refuses to start children from a jobqd other than the master's."""
    try:
        return importlib.metadata.version("jobqd")
    except importlib.metadata.PackageNotFoundError:
        return None


def bind_listener(http: HttpSettings) -> socket.socket:
    """The http child's listening socket, bound by the master so that a taken address fails
    the start (or the reload) at once; the http child inherits it. Raises OSError."""
    host, port = http.host or "", http.port or 0
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=64)
    listener.set_inheritable(False)  # forked, not exec'd: the http child keeps it anyway
    return listener


def listen_error(http: HttpSettings, exc: OSError) -> str:
    return (
        f"cannot listen on {http.listen} (http.listen): {exc.strerror or exc}; stop what "
        "holds that address or set another http.listen"
    )


class Supervisor:
    """The master: `run()` returns the process exit code."""

    def __init__(self, settings: config.Settings, *, config_path: str, migrate: bool) -> None:
        self.settings = settings
        self.config_path = config_path
        self.migrate = migrate
        self.pid = os.getpid()
        self.dsn = ""
        self.prepared = False  # the database answered and is migrated: workers may start
        self.preparing = "starting"  # why not prepared yet, for /readyz and STATUS
        self.listener: socket.socket | None = None  # http.listen, bound by the master
        self.helpers: dict[int, Helper] = {}
        self._preparer: Helper | None = None
        self._checker: Helper | None = None
        self._pending_reload: config.Settings | None = None
        self._next_progress = math.inf
        self._migrating_since = 0.0
        self._prepare_at = 0.0
        self.specs: list[ChildSpec] = specs_for(settings)
        self.children: dict[int, Child] = {}
        self.restarts: dict[Ident, Restarts] = {}
        self.metric_store = MetricStore()
        self.metrics = define_jobqd_metrics(self.metric_store)
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._signals: list[int] = []
        self._stopping: str | None = None  # None, "drain" or "fast"
        self._exit_code = EXIT_OK
        self._ready = False
        self._ready_deadline = math.inf
        self._worker_booted = False
        # Per queue, the process ids of worker children that died and how: the next worker
        # of the queue takes their jobs back at once, naming the death in their errors.
        self._dead_workers: dict[str, list[tuple[int, str]]] = {}
        self._status = ""
        self._reload_failed = False
        self.roll: Roll | None = None  # the last roll, while and after it runs
        self._roll_pending = False  # the config check under way is a roll's
        self.generation = 0  # the roll whose code the children started now run
        self.version = installed_version()
        self._title = "master"
        self._watchdog = sdnotify.watchdog_interval()
        self._health_file = healthfile.HealthFile.from_environment()
        self._next_watchdog = 0.0
        self._next_feed = 0.0

    # -- signals --------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in MASTER_SIGNALS:
            signal.signal(signum, _record_signal)

    def _take_signals(self) -> None:
        try:
            while data := os.read(self._wake_r, 4096):
                self._signals.extend(data)
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        self._take_signals()
        pending, self._signals = self._signals, []
        for signum in pending:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self._stopping is None:
                    self._drain(signal.Signals(signum).name)
                else:
                    self._fast_stop(f"second {signal.Signals(signum).name}")
            elif signum == signal.SIGQUIT:
                self._fast_stop("SIGQUIT")
            elif signum == signal.SIGHUP and self._stopping is None:
                self._reload()
            elif signum == signal.SIGUSR2 and self._stopping is None:
                self._request_roll()

    # -- startup --------------------------------------------------------------------------

    def run(self) -> int:
        """Bind http.listen, start the http child and the database preparation, supervise
        until stopped. The workers and maintenance start once the database is prepared."""
        if self.settings.http.listen:
            try:
                self.listener = bind_listener(self.settings.http)
            except OSError as exc:
                log.critical("%s; not starting", listen_error(self.settings.http, exc))
                return EXIT_FAILURE
        self._install_signals()
        set_title("master")
        self.dsn = resolve_database(self.settings.database)  # DatabaseUnavailable: exit 3
        try:
            return self._supervise()
        except Exception:
            log.critical("master failed; stopping every child fast", exc_info=True)
            self._abort()
            return EXIT_FAILURE

    def database_ready(self) -> None:
        """The database answers and is migrated: from now on every child may start."""
        self.prepared = True
        self.preparing = ""
        self._next_progress = math.inf
        self._ready_deadline = time.monotonic() + READY_TIMEOUT

    # -- helpers: preparing the database, checking a reload -------------------------------

    def _start_helper(self, name: str, work: Any, deadline: float) -> Helper | None:
        try:
            helper = start_helper(
                name,
                work,
                deadline=deadline,
                close_fds=self._inherited(),
                log_format=self.settings.log.format,
                log_level=self.settings.log.level,
            )
        except OSError as exc:
            log.error("cannot fork the %s helper: %s", name, exc)
            return None
        self.helpers[helper.pid] = helper
        self.selector.register(helper.fd, selectors.EVENT_READ, helper)
        return helper

    def _start_preparing(self, now: float) -> None:
        database, migrate = self.settings.database, self.migrate

        def work(report: Any) -> dict[str, Any]:
            self._drop_listener()
            return prepare(self.dsn, database.schema, migrate=migrate, report=report)

        self._preparer = self._start_helper("prepare", work, math.inf)
        self._prepare_at = now + 1.0  # if that failed, or for the next try

    def _helper_said(self, helper: Helper) -> None:
        messages = helper.read()
        if not helper.listening:  # its pipe closed: it is exiting
            self.selector.unregister(helper.fd)
        for message in messages:
            if helper is self._preparer and message.get("kind") == "progress":
                state = str(message.get("state") or "")
                if state != self.preparing:
                    self.preparing = state
                    sdnotify.notify(f"STATUS={state.partition(':')[0]}")
                if state == MIGRATING and self._next_progress == math.inf:
                    self._migrating_since = time.monotonic()
                    self._next_progress = self._migrating_since + PROGRESS_EVERY

    def _helper_exited(self, helper: Helper, status: int) -> None:
        if helper.listening:
            self._helper_said(helper)
        if helper.listening:  # exited with the pipe still open (a grandchild holds it)
            helper.listening = False
            self.selector.unregister(helper.fd)
        helper.close()
        verdict = helper.verdict
        how, _ = describe_exit(status)
        if helper is self._preparer:
            self._preparer = None
            self._prepared_verdict(verdict, how)
        elif helper is self._checker:
            self._checker = None
            self._checked(verdict, how)

    def _prepared_verdict(self, verdict: dict[str, Any] | None, how: str) -> None:
        if self._stopping is not None:
            return
        if verdict is not None and verdict.get("ok"):
            self.database_ready()
            return
        if verdict is None or verdict.get("exit") is None:
            error = verdict.get("error") if verdict else f"the preparation exited: {how}"
            log.warning("%s; trying again", error)
            return
        log.critical("%s; not starting", verdict.get("error"))
        self._exit_code = int(verdict["exit"])
        self._fast_stop("cannot work with this database")

    def _kill_overdue_helpers(self, now: float) -> None:
        for helper in self.helpers.values():
            if now >= helper.deadline:
                helper.deadline = math.inf
                log.error("the %s helper took too long; killing it", helper.name)
                helper.kill()

    def _progress(self, now: float) -> None:
        """While migrating (or waiting for another node's migration), tell systemd and the
        log that the start is still making progress, so TimeoutStartSec does not kill it."""
        if now < self._next_progress:
            return
        self._next_progress = now + PROGRESS_EVERY
        elapsed = now - self._migrating_since
        log.info("%s: still at it after %.0fs", MIGRATION_STEP, elapsed)
        sdnotify.notify(
            f"EXTEND_TIMEOUT_USEC={int(PROGRESS_EVERY * 3_000_000)}",
            f"STATUS={MIGRATION_STEP} ({elapsed:.0f}s)",
        )

    # -- the loop -------------------------------------------------------------------------

    def _supervise(self) -> int:
        self.metrics.up.set(1)
        names = ", ".join(spec.name for spec in self.specs)
        log.info("master started: %d children (%s)", len(self.specs), names)
        self._turn(time.monotonic())
        while not (self._stopping and not self.children and not self.helpers):
            ready = self.selector.select(self._wait(time.monotonic()))
            self._handle_signals()
            for key, _ in ready:
                if isinstance(key.data, Helper) and key.data.listening:
                    self._helper_said(key.data)
            self._reap()
            for key, _ in ready:
                child = key.data
                if isinstance(child, Child) and self.children.get(child.pid) is child:
                    self._read(child)
            self._turn(time.monotonic())
        log.info("master stopped")
        self.metrics.up.set(0)
        if self._health_file:
            self._health_file.remove()
        return self._exit_code

    def _turn(self, now: float) -> None:
        """The chores of one loop turn, after signals, exits and messages."""
        self._enforce_deadlines(now)
        self._kill_overdue_helpers(now)
        if self._stopping is None:
            if not self.prepared and self._preparer is None and now >= self._prepare_at:
                self._start_preparing(now)
            self._progress(now)
            self._advance_roll(now)
            self._converge(now)
            self._check_crash_loops(now)
            self._check_boot_failure()
            self._check_ready(now)
        elif self._stopping == "drain":
            self._stop_http_last(now)
        self._notify(now)
        self._feed(now)
        self._retitle()

    def _wait(self, now: float) -> float:
        deadlines = [now + MAX_WAIT, self._next_progress]
        if self._watchdog:
            deadlines.append(self._next_watchdog)
        if any(c.feed for c in self.children.values()):
            deadlines.append(self._next_feed)
        if self.prepared and not self._ready and self._stopping is None:
            deadlines.append(self._ready_deadline)
        if not self.prepared and self._preparer is None:
            deadlines.append(self._prepare_at)
        deadlines += [h.deadline for h in self.helpers.values()]
        for child in self.children.values():
            if child.quit_at is not None and not child.quit_sent:
                deadlines.append(child.quit_at)
            if child.kill_at is not None and not child.killed:
                deadlines.append(child.kill_at)
            if self._watched(child):
                deadlines.append(child.last_heard + self.settings.child_timeout)
        if self._stopping is None:
            filled = self._filled()
            for spec in self._startable():
                if spec.ident not in filled:
                    deadlines.append(self._restarts(spec).next_start)
            if self.roll is not None:
                deadlines += [r.started_at + BOOT_TIMEOUT for r in self.roll.replacing.values()]
        return max(0.0, min(deadlines) - now)

    def _restarts(self, spec: ChildSpec) -> Restarts:
        return self.restarts.setdefault(spec.ident, Restarts())

    # -- children -------------------------------------------------------------------------

    def _startable(self) -> list[ChildSpec]:
        """The specs that may run now: all once the database is prepared, before that only
        the http child (it needs no database to say how the master is)."""
        return self.specs if self.prepared else [s for s in self.specs if s.kind == HTTP]

    def _filled(self) -> set[Ident]:
        """The spec identities a child not being stopped fills (in a roll, maybe one whose
        settings are older than its spec's, until its turn to be replaced)."""
        return {c.spec.ident for c in self.children.values() if c.stopping_since is None}

    def _converge(self, now: float) -> None:
        """Start every wanted child that has no process and whose restart delay is over."""
        filled = self._filled()
        for spec in self._startable():
            if spec.ident not in filled and now >= self._restarts(spec).next_start:
                self._spawn(spec)

    def _inherited(self) -> list[int]:
        """The master's fds a fork must close: its wake-up pipe, selector, every child's and
        helper's pipe. (The listening socket is closed by `_drop_listener`.)"""
        fds = [self._wake_r, self._wake_w]
        with contextlib.suppress(AttributeError, ValueError, OSError):
            fds.append(self.selector.fileno())  # type: ignore[attr-defined]
        for child in self.children.values():
            fds.append(child.fd)
            if child.feed is not None:
                fds.append(child.feed.fd)
        fds += [helper.fd for helper in self.helpers.values()]
        return fds

    def _drop_listener(self) -> None:
        """In a fork that does not serve http: close its copy of the listening socket."""
        if self.listener is not None:
            self.listener.close()

    def _spawn(self, spec: ChildSpec) -> Child | None:
        """Fork a child for `spec`; None when the fork failed (it is tried again in 1s)."""
        read_fd, write_fd = os.pipe()
        feed_read = feed_write = None
        if spec.kind == HTTP:
            feed_read, feed_write = os.pipe()
            with contextlib.suppress(OSError):
                fcntl.fcntl(feed_write, _F_SETPIPE_SZ, _FEED_PIPE_SIZE)
        dead_workers = (
            tuple(self._dead_workers.pop(spec.queue or "", ())) if spec.kind == WORKER else ()
        )
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            if dead_workers:
                self._dead_workers.setdefault(spec.queue or "", []).extend(dead_workers)
            for fd in (read_fd, write_fd, feed_read, feed_write):
                if fd is not None:
                    os.close(fd)
            log.error("cannot fork %s: %s; trying again in 1s", spec.name, exc)
            self._restarts(spec).next_start = time.monotonic() + 1.0
            return None
        if pid == 0:
            own_ends = [read_fd] if feed_write is None else [read_fd, feed_write]
            run_and_exit(
                lambda: self._child_main(spec, write_fd, feed_read, own_ends, dead_workers),
                spec.name,
                {"child": spec.name},
            )
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        feed = None
        if feed_read is not None and feed_write is not None:
            os.close(feed_read)
            os.set_blocking(feed_write, False)
            feed = Feed(feed_write)
        child = Child(spec, pid, read_fd, feed=feed, generation=self.generation)
        if spec.kind == WORKER:
            child.concurrency = self.settings.queues[spec.queue].concurrency
        self.children[pid] = child
        self.selector.register(read_fd, selectors.EVENT_READ, child)
        log.info("started %s", spec.name, extra=child.fields())
        if feed is not None:
            self._next_feed = 0.0
        return child

    def _child_main(
        self,
        spec: ChildSpec,
        write_fd: int,
        feed_fd: int | None,
        master_ends: list[int],
        dead_workers: tuple[tuple[int, str], ...],
    ) -> int:
        """Runs in the forked child: clean up what came from the master, then serve. The
        master's ends of this child's own pipes are closed too, so that a dead master shows
        as a broken pipe (and, for the http child, as the end of its feed)."""
        inherited = [*self._inherited(), *master_ends]
        if spec.kind != HTTP:
            self._drop_listener()
        become_child(
            master_pid=self.pid,
            role=spec.kind,
            title=spec.name,
            close_fds=inherited,
            log_format=self.settings.log.format,
            log_level=self.settings.log.level,
            generation=self.generation,
        )
        self.metric_store.reset()
        context = ChildContext(
            settings=self.settings,
            dsn=self.dsn,
            sender=Sender(write_fd),
            parent_pid=self.pid,
            on_title=set_title,
            queue=spec.queue,
            index=spec.index,
            dead_workers=dead_workers,
            feed_fd=feed_fd,
            listener=self.listener if spec.kind == HTTP else None,
        )
        return role_entry(spec.kind)(context)

    def _read(self, child: Child) -> None:
        """Handle what `child` sent, up to the end of what is available."""
        while child.listening:
            documents, still_open = child.receiver.read()
            for message in filter(None, map(decode, documents)):
                self._message(child, message)
            if not still_open:  # closed before the child exited: stop watching it
                self.selector.unregister(child.fd)
                child.listening = False
            if not documents:
                return

    def _message(self, child: Child, message: Message) -> None:
        child.last_heard = time.monotonic()
        match message:
            case Booted(process_id=process_id) if not child.booted:
                child.booted_at = time.monotonic()
                child.process_id = process_id
                self._restarts(child.spec).booted()
                if child.spec.kind == WORKER:
                    self._worker_booted = True
                log.info("%s booted", child.spec.name, extra=child.fields())
            case Status(busy=busy, concurrency=concurrency, leader=leader, metrics=metrics):
                if busy is not None:
                    child.busy = busy
                if concurrency is not None:
                    child.concurrency = concurrency
                if leader is not None:
                    child.leader = leader
                if metrics is not None:
                    self.metric_store.merge(metrics, source=child.source)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            helper = self.helpers.pop(pid, None)
            if helper is not None:
                self._helper_exited(helper, status)
                continue
            child = self.children.pop(pid, None)
            if child is None:
                log.debug("reaped process %d, not one of ours", pid)
                continue
            self._exited(child, status)

    def _exited(self, child: Child, status: int) -> None:
        self._read(child)  # its last words: final metrics
        if child.listening:
            self.selector.unregister(child.fd)
        child.close()
        self.metric_store.forget(child.source)
        how, fields = describe_exit(status, killed_by_us=child.killed)
        if child.kill_reason is not None and os.WIFSIGNALED(status):
            how = child.kill_reason
        fields.update(child.fields())
        if child.spec.kind == WORKER and child.process_id is not None:
            # Gone for sure: whatever it still held can be released without waiting for
            # leases to expire, and its jobs' errors say how it died. (A worker that exited
            # cleanly held nothing: a no-op.)
            dead = self._dead_workers.setdefault(child.spec.queue or "", [])
            dead.append((child.process_id, how))
        if child.replaces is not None and child.stopping_since is None:
            when = "right after it booted" if child.booted else "before it booted"
            self._replacement_failed(child, f"exited {when}: {how}")
            return
        if child.stopping_since is not None or self._stopping is not None:
            log.info("%s exited: %s", child.spec.name, how, extra=fields)
            return
        now = time.monotonic()
        restarts = self._restarts(child.spec)
        if child.booted and os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RECYCLE:
            log.info("%s recycled itself; starting a new one", child.spec.name, extra=fields)
            restarts.next_start = now
            return
        was_looping = restarts.crash_looping
        delay = restarts.exited(child, now, how)
        restarts.total += 1
        self.metrics.child_restarts.inc(child.spec.kind)
        if restarts.crash_looping and not was_looping:
            log.error(
                "%s is crash-looping: %s (last: %s); the other children keep running and it "
                "is restarted in %.0fs: fix the error logged above (for a worker, look for a "
                "job that kills its process: `jobqctl jobs --state dead`)",
                child.spec.name,
                restarts.describe(),
                how,
                delay,
                extra=fields,
            )
        else:
            log.error(
                "%s exited unexpectedly: %s; restarting in %.1fs",
                child.spec.name,
                how,
                delay,
                extra=fields,
            )

    def _check_crash_loops(self, now: float) -> None:
        """Let deaths age out of the crash-loop window: say when a loop is over, and keep
        the crash-loop gauge per child kind and queue."""
        looping: dict[tuple[str, str], int] = {}
        for spec in self.specs:
            restarts = self._restarts(spec)
            if restarts.refresh(now) and not restarts.crash_looping:
                log.info(
                    "%s is no longer crash-looping (%d restarts in all)",
                    spec.name,
                    restarts.total,
                    extra={"child": spec.name, "child_role": spec.kind},
                )
            key = (spec.kind, spec.queue or "")
            looping[key] = looping.get(key, 0) + int(restarts.crash_looping)
        for (kind, queue), count in looping.items():
            self.metrics.child_crash_looping.set(count, kind, queue)

    def _check_boot_failure(self) -> None:
        """When no worker has ever booted and every worker spec crash-loops, the code or its
        environment is broken: stop with EXIT_BOOT_FAILED so systemd shows a failed unit."""
        workers = [s for s in self.specs if s.kind == WORKER]
        if self._worker_booted or not workers:
            return
        if all(self._restarts(s).crash_looping for s in workers):
            log.critical(
                "no worker process could boot (see the errors above); stopping with exit status %d",
                EXIT_BOOT_FAILED,
            )
            self._exit_code = EXIT_BOOT_FAILED
            self._fast_stop("no worker could boot")

    # -- stopping -------------------------------------------------------------------------

    def _stop_child(self, child: Child, now: float, timeout: float) -> None:
        """Ask `child` to drain: TERM now, QUIT after `timeout`, SIGKILL QUIT_GRACE later."""
        if child.stopping_since is not None:
            return
        child.stopping_since = now
        child.quit_at = now + timeout
        child.kill_at = child.quit_at + QUIT_GRACE
        child.signal(signal.SIGTERM)

    def _drain(self, reason: str) -> None:
        """TERM every child but http, which keeps answering probes and scrapes until the
        last of the others has exited (`_stop_http_last`)."""
        self._stopping = "drain"
        timeout = self.settings.shutdown_timeout
        log.info(
            "%s: draining; running jobs may finish for up to %.1fs, then they are released",
            reason,
            timeout,
        )
        sdnotify.notify("STOPPING=1", "STATUS=draining")
        self._stop_helpers()
        self._roll_stopped()
        now = time.monotonic()
        for child in self.children.values():
            if child.spec.kind != HTTP:
                self._stop_child(child, now, timeout)
        self._stop_http_last(now)

    def _stop_http_last(self, now: float) -> None:
        if any(c.spec.kind != HTTP for c in self.children.values()):
            return
        for child in self.children.values():
            self._stop_child(child, now, self.settings.shutdown_timeout)

    def _stop_helpers(self) -> None:
        for helper in self.helpers.values():
            helper.kill()
        self._pending_reload = None

    def _roll_stopped(self) -> None:
        if self.roll is not None and self.roll.active:
            self.roll.fail("stopping", "the daemon is stopping")
            self._roll_pending = False

    def _fast_stop(self, reason: str) -> None:
        if self._stopping is None:
            sdnotify.notify("STOPPING=1", "STATUS=stopping")
        self._stopping = "fast"
        log.warning("%s: stopping fast; running jobs are released to their queues", reason)
        self._stop_helpers()
        self._roll_stopped()
        now = time.monotonic()
        for child in self.children.values():
            child.stopping_since = child.stopping_since or now
            child.quit_at = now
            child.kill_at = min(child.kill_at or math.inf, now + FAST_STOP_GRACE)
        self._enforce_deadlines(now)

    def _watched(self, child: Child) -> bool:
        """Whether `child` must keep reporting: booted, wanted, not already being killed."""
        return child.booted and child.stopping_since is None and not child.killed

    def _enforce_deadlines(self, now: float) -> None:
        for child in self.children.values():
            if self._watched(child) and now - child.last_heard > self.settings.child_timeout:
                child.killed = True
                child.kill_reason = HUNG
                log.error(
                    "%s sent nothing for %.0fs (child_timeout): it is hung; killing it and "
                    "starting another. If this repeats, look for a task that blocks in C code "
                    "or holds the GIL",
                    child.spec.name,
                    now - child.last_heard,
                    extra=child.fields(),
                )
                child.signal(signal.SIGKILL)
            if child.quit_at is not None and now >= child.quit_at and not child.quit_sent:
                child.quit_sent = True
                if self._stopping != "fast":
                    log.warning(
                        "%s still running after the shutdown timeout; telling it to release "
                        "its jobs and exit",
                        child.spec.name,
                        extra=child.fields(),
                    )
                child.signal(signal.SIGQUIT)
            if child.kill_at is not None and now >= child.kill_at and not child.killed:
                child.killed = True
                log.warning(
                    "%s did not exit in time; killing it", child.spec.name, extra=child.fields()
                )
                child.signal(signal.SIGKILL)

    def _abort(self) -> None:
        """Last resort after a bug in the loop: QUIT every child, SIGKILL what is left."""
        deadline = time.monotonic() + FAST_STOP_GRACE
        self._stop_helpers()
        for child in self.children.values():
            child.signal(signal.SIGQUIT)
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                self.children.pop(pid, None)
            else:
                time.sleep(0.05)
        for child in self.children.values():
            child.signal(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)

    # -- reload ---------------------------------------------------------------------------

    def _reload(self, *, roll: bool = False) -> None:
        """Parse the config file here (plain YAML, no user code), then check it the way
        `jobqd --check` does in a helper process, which imports the modules and resolves
        the tasks and cron entries; `_checked` applies it only if that passed, and then
        begins the roll if this (or a reload it overtook) was one."""
        self._roll_pending = self._roll_pending or roll
        sdnotify.reloading()
        log.info("reloading %s", self.config_path)
        try:
            new = config.load(self.config_path)
        except config.ConfigError as exc:
            self._reload_failed_with(exc.errors)
            return
        if self._checker is not None:  # a newer HUP wins over a check still running
            self._checker.kill()
        path = self.config_path

        def work(report: Any) -> dict[str, Any]:
            self._drop_listener()
            from jobqd.cli.daemon import check_config

            errors, warnings = check_config(path)
            return {"errors": errors, "warnings": warnings, "version": installed_version()}

        self._pending_reload = new
        self._checker = self._start_helper("reload check", work, time.monotonic() + CHECK_TIMEOUT)
        if self._checker is None:
            self._reload_failed_with(["cannot start the configuration check (fork failed)"])

    def _checked(self, verdict: dict[str, Any] | None, how: str) -> None:
        new, self._pending_reload = self._pending_reload, None
        if new is None or self._stopping is not None:
            return
        if verdict is None:
            self._reload_failed_with([f"the configuration check did not finish: {how}"])
            return
        for warning in verdict.get("warnings") or ():
            log.warning("reload: %s: warning: %s", self.config_path, warning)
        if verdict.get("errors"):
            self._reload_failed_with([str(e) for e in verdict["errors"]])
            return
        roll, self._roll_pending = self._roll_pending, False
        if roll and verdict.get("version") != self.version:
            self._roll_refused(
                "version",
                f"jobqd itself changed on disk ({self.version} -> {verdict.get('version')}): a "
                "roll starts workers from the master's jobqd, which would mix two versions; "
                "nothing was changed: restart the daemon to run the new jobqd "
                "(systemctl restart jobqd)",
            )
            return
        self._apply_reload(new, roll=roll)

    def _reload_failed_with(self, errors: list[str]) -> None:
        for error in errors:
            log.error("reload: %s", error)
        log.error(
            "reload failed: %s has %d error(s); still running on the previous configuration",
            self.config_path,
            len(errors),
        )
        self._reload_failed = True
        if self._roll_pending:
            self._roll_pending = False
            self._roll_refused("config", f"{self.config_path} did not pass the check")
        self._status = self.status_line()
        sdnotify.notify("READY=1", f"STATUS={self._status}")

    def _rebind(self, plan: ReloadPlan) -> bool:
        """Bind a changed http.listen before anything else changes; False if it cannot be."""
        old, new = self.settings.http.listen, plan.settings.http.listen
        if new == old:
            return True
        listener = None
        if new:
            try:
                listener = bind_listener(plan.settings.http)
            except OSError as exc:
                self._reload_failed_with([listen_error(plan.settings.http, exc)])
                return False
        if self.listener is not None:
            self.listener.close()  # the running http child keeps its own copy until it exits
        self.listener = listener
        return True

    def _apply_reload(self, new: config.Settings, *, roll: bool = False) -> None:
        """Stop the children whose settings changed and start the new ones; in a roll, the
        workers whose queue stays are left for the roll to replace, each in its turn."""
        old = self.settings
        plan = plan_reload(old, self.specs, new)
        if not self._rebind(plan):
            if roll:
                self._roll_refused("config", "the new http.listen cannot be bound")
            return
        self._reload_failed = False
        if plan.database_changed:
            log.warning("database settings changed: they take effect at the next restart")
        if plan.log_changed:
            setup_logging(plan.settings.log.format, plan.settings.log.level, role="master")
        now = time.monotonic()
        rolled = {s.ident for s in plan.specs if s.kind == WORKER} if roll else set()
        for child in list(self.children.values()):
            if child.stopping_since is None and not plan.keeps(child.spec):
                if child.spec.ident in rolled:
                    continue
                log.info("stopping %s: its settings changed", child.spec.name, extra=child.fields())
                self._stop_child(child, now, old.shutdown_timeout)
        self.restarts = plan.restarts(self.restarts)
        self.settings, self.specs = plan.settings, plan.specs
        if roll:
            self._begin_roll(now)
        self._converge(now)
        log.info(
            "reloaded: %d replaced, %d started, %d retired, %d unchanged",
            len(plan.replaced),
            len(plan.started),
            len(plan.retired),
            plan.unchanged,
            extra=plan.changes(),
        )
        self._status = self.status_line()
        sdnotify.notify("READY=1", f"STATUS={self._status}")

    # -- rolling ---------------------------------------------------------------------------

    def _request_roll(self) -> None:
        """USR2: a new roll, unless one is under way (a second USR2 is not queued)."""
        if self.roll is not None and self.roll.active:
            log.warning(
                "roll %d is still under way (%s): SIGUSR2 ignored; roll again once it ended",
                self.roll.number,
                self.roll.progress(),
            )
            return
        number = self.roll.number + 1 if self.roll is not None else 1
        self.roll = Roll(number, started_at=time.monotonic())
        log.info("roll %d: checking %s, then replacing every worker", number, self.config_path)
        self._reload(roll=True)

    def _roll_refused(self, where: str, why: str) -> None:
        assert self.roll is not None
        self.roll.fail(where, why)
        log.error("roll %d refused: %s", self.roll.number, why)

    def _begin_roll(self, now: float) -> None:
        """The config is applied: from now on children start in this roll's generation, and
        every worker started before it is to be replaced."""
        roll = self.roll
        assert roll is not None
        self.generation = roll.number
        older = [
            c.spec.ident
            for c in self.children.values()
            if c.spec.kind == WORKER and c.stopping_since is None and c.generation < roll.number
        ]
        roll.begin(plan_roll(self.specs, older))
        log.info(
            "roll %d: replacing %d worker(s) in %d step(s), one queue at a time",
            roll.number,
            roll.total,
            len(roll.steps),
        )

    def _advance_roll(self, now: float) -> None:
        """Drain each old worker whose replacement booted; give up on a replacement that
        takes too long; once a step is through, start the next one."""
        roll = self.roll
        if roll is None or roll.state != ROLLING:
            return
        for ident, step in list(roll.replacing.items()):
            new = self.children.get(step.new_pid)
            if new is None or new.stopping_since is not None:  # a HUP replaced it meanwhile
                del roll.replacing[ident]
                roll.replaced += 1
                continue
            if new.booted:
                del roll.replacing[ident]
                roll.replaced += 1
                new.replaces = None
                old = self.children.get(step.old_pid)
                log.info(
                    "roll %d: %s replaced (%d/%d): pid %d booted in %.1fs, pid %d drains",
                    roll.number,
                    new.spec.name,
                    roll.replaced,
                    roll.total,
                    new.pid,
                    (new.booted_at or now) - step.started_at,
                    step.old_pid,
                    extra=new.fields(),
                )
                if old is not None:
                    self._stop_child(old, now, self.settings.shutdown_timeout)
            elif now - step.started_at >= BOOT_TIMEOUT:
                self._replacement_failed(new, f"did not boot within {BOOT_TIMEOUT:.0f}s")
                self._stop_child(new, now, self.settings.shutdown_timeout)
                return
        while not roll.replacing and roll.state == ROLLING:
            idents = roll.next_step()
            if idents is None:
                roll.finish()
                log.info(
                    "roll %d done: %d worker(s) replaced in %.1fs",
                    roll.number,
                    roll.replaced,
                    now - roll.started_at,
                )
                return
            for ident in idents:
                self._replace(roll, ident, now)

    def _replace(self, roll: Roll, ident: Ident, now: float) -> None:
        """Start the replacement of the worker filling `ident`, beside it. Nothing to do when
        none runs there or it already runs this roll's code (it was restarted meanwhile)."""
        old = next(
            (
                c
                for c in self.children.values()
                if c.spec.ident == ident and c.stopping_since is None and c.replaces is None
            ),
            None,
        )
        spec = next((s for s in self.specs if s.ident == ident), None)
        if old is None or spec is None or old.generation >= roll.number:
            roll.replaced += 1
            return
        new = self._spawn(spec)
        if new is None:
            roll.fail(spec.name, f"cannot fork a replacement for {spec.name}")
            log.error(
                "roll %d stopped: cannot fork a replacement for %s; the workers not yet "
                "replaced keep running: roll again once the host has memory and processes",
                roll.number,
                spec.name,
            )
            return
        new.replaces = old.pid
        roll.replacing[ident] = Replacement(old.pid, new.pid, now)
        log.info(
            "roll %d: replacing %s (pid %d) with pid %d",
            roll.number,
            spec.name,
            old.pid,
            new.pid,
            extra=new.fields(),
        )

    def _replacement_failed(self, child: Child, why: str) -> None:
        """A replacement did not boot: stop the roll, leaving the worker it was to replace
        and every worker not yet replaced as they are; stop the other replacements of the
        step, which have no jobs yet."""
        roll = self.roll
        child.replaces = None
        if roll is None or roll.state != ROLLING:
            return
        now = time.monotonic()
        roll.replacing.pop(child.spec.ident, None)
        for other in roll.replacing.values():
            if (booting := self.children.get(other.new_pid)) is not None:
                booting.replaces = None
                self._stop_child(booting, now, self.settings.shutdown_timeout)
        roll.replacing.clear()
        name = child.spec.name
        roll.fail(name, f"the replacement for {name} {why}")
        log.error(
            "roll %d stopped: the replacement for %s %s; %s and the %d other worker(s) not "
            "yet replaced keep running their code (%d of %d were replaced): fix the error "
            "logged above, or put the previous code back, and roll again",
            roll.number,
            name,
            why,
            name,
            max(0, roll.total - roll.replaced - 1),
            roll.replaced,
            roll.total,
            extra=child.fields(),
        )

    def _retitle(self) -> None:
        """The master's title says how its last roll went: `jobqctl roll` reads it."""
        title = self.roll.title() if self.roll is not None else "master"
        if title != self._title:
            self._title = title
            set_title(title)

    # -- reporting ------------------------------------------------------------------------

    def _check_ready(self, now: float) -> None:
        if self._ready or not self.prepared:
            return
        running = {c.spec.ident for c in self.children.values() if c.booted}
        settled = all(
            spec.ident in running or self._restarts(spec).crash_looping for spec in self.specs
        )
        if not settled and now < self._ready_deadline:
            return
        self._ready = True
        self._status = self.status_line()
        sdnotify.notify("READY=1", f"STATUS={self._status}")
        if settled:
            log.info("ready: %s", self._status)
        else:
            waiting = ", ".join(s.name for s in self.specs if s.ident not in running)
            log.warning("ready, but still waiting for %s to boot: %s", waiting, self._status)

    def status_line(self) -> str:
        """The STATUS= line (jobqd.daemon.report)."""
        return report.status_line(
            self.children.values(),
            self.specs,
            self.restarts,
            stopping=self._stopping,
            reload_failed=self._reload_failed,
            roll=self.roll,
            now=time.monotonic(),
        )

    def _notify(self, now: float) -> None:
        if self._ready:
            status = self.status_line()
            if status != self._status:
                self._status = status
                sdnotify.notify(f"STATUS={status}")
        if self._watchdog and now >= self._next_watchdog:
            sdnotify.notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog
        if self._health_file:
            self._health_file.beat(now, self._status or self.preparing)

    def health(self) -> dict[str, Any]:
        """The `health` message for the http child (jobqd.daemon.report)."""
        return report.health(
            self.children.values(),
            self.specs,
            self.restarts,
            preparing=self.preparing,
            ready=self._ready,
            stopping=self._stopping is not None,
            status=self.status_line(),
            roll=self.roll,
            master_alive_at=time.time(),
            now=time.monotonic(),
        )

    def _feed(self, now: float) -> None:
        feeds = [c.feed for c in self.children.values() if c.feed is not None]
        if not feeds:
            return
        if now < self._next_feed:
            for feed in feeds:
                feed.flush()
            return
        self._next_feed = now + FEED_INTERVAL
        metrics = {"kind": "metrics", "snapshot": self.metric_store.snapshot()}
        health = self.health()
        for feed in feeds:
            feed.send(metrics, health)


def _record_signal(signum: int, frame: object) -> None:
    """Nothing to do: the signal number reaches the loop through the wake-up fd."""

"""`jobqd`: the daemon's command line. `jobqd -c FILE` runs the master; `--check` validates.

Exit codes (jobqd.errors): 0 clean stop, 1 unexpected error, a failed `--check` (as
`nginx -t` does), an http.listen that cannot be bound or a failed migration, 2 usage, 3 the
embedded database cannot start, 4 no worker could boot, 78 invalid configuration when
starting for real, or a database behind a transaction-mode pooler.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import stat
import sys
from pathlib import Path

from jobqd import __version__, config, tasks
from jobqd.cli import starter
from jobqd.config import CONFIG_ENV, DEFAULT_CONFIG, yamlload
from jobqd.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    DatabaseUnavailable,
)
from jobqd.observe import healthfile
from jobqd.observe.logs import setup_logging

log = logging.getLogger("jobqd.master")

# A password written into the file: user:password@ in a URL, or a password= keyword, whose
# value is not an ${ENV} reference.
_PASSWORD = re.compile(r"://[^\s:/@]+:(?!\$\{)[^\s@]+@|password\s*=\s*(?!\$\{)\S", re.I)


def build_parser() -> argparse.ArgumentParser:
    """The command line; jobqd.cli.manual renders jobqd(8) from it."""
    parser = argparse.ArgumentParser(
        prog="jobqd",
        description="Run the jobqd daemon: a master process that supervises worker, "
        "maintenance and http processes. TERM/INT drain, QUIT stops fast, HUP reloads.",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"the YAML config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config, import its modules and resolve cron tasks, then exit 0 or 1",
    )
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply database migrations at start (same as database.migrate: false)",
    )
    parser.add_argument(
        "--health",
        action="store_true",
        help=f"for container health checks, needing no config: exit 0 if the master that "
        f"${healthfile.ENV} names rewrote that file in the last {healthfile.MAX_AGE:g}s "
        "and is alive, else 1",
    )
    parser.add_argument(
        "--init",
        metavar="DIR",
        help=f"write a starter into DIR: a commented config ({starter.CONFIG}) and an example "
        f"tasks module ({starter.MODULE}.py) that run at once; never overwrites a file",
    )
    parser.add_argument("--version", action="version", version=f"jobqd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.health:
        return health()
    if args.init:
        return starter.init(args.init)
    path = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    if args.config:
        hint = ""
    elif os.environ.get(CONFIG_ENV):
        hint = f" (named by ${CONFIG_ENV}; pass -c FILE for another)"
    else:
        hint = f" (the default; pass -c FILE or set ${CONFIG_ENV})"
    if args.check:
        return check(path, hint)
    return start(path, hint, migrate=not args.no_migrate)


def health() -> int:
    """`jobqd --health`: one line saying whether the master is alive and turning."""
    path = os.environ.get(healthfile.ENV)
    if not path:
        print(f"jobqd: set {healthfile.ENV} (the daemon's too) to use --health", file=sys.stderr)
        return EXIT_USAGE
    verdict = healthfile.check(Path(path))
    print(f"jobqd: {verdict.message}", file=sys.stdout if verdict.healthy else sys.stderr)
    return EXIT_OK if verdict.healthy else EXIT_FAILURE


def check(path: str, hint: str = "") -> int:
    """`jobqd --check`: print every problem, or "configuration ok"."""
    errors, warnings = check_config(path)
    for warning in warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        print(f"jobqd: configuration file {path} test failed{hint}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{path}: configuration ok")
    return EXIT_OK


def check_config(path: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the config at `path`, beyond what parsing finds: every module in
    `imports:` imports, every cron entry names a registered or command task. Imports the
    modules into this process."""
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        return exc.errors, []
    document = yamlload.load(Path(path).read_text(encoding="utf-8"), path)
    problems: list[tuple[int, str]] = []

    def error(key: yamlload.Path, message: str) -> None:
        line = document.line(key)
        problems.append((line, yamlload.format_error(path, line, key, message)))

    for index, module in enumerate(settings.imports):
        try:
            tasks.import_modules([module], settings.import_path())
        except ImportError as exc:
            error(("imports", index), str(exc))
    tasks.register_commands(settings.tasks, grace=0.0)  # looked up here, never run
    known = tasks.registry.names()
    for name, entry in settings.cron.items():
        if tasks.registry.get(entry.task) is None:
            close = difflib.get_close_matches(entry.task, known, n=1)
            suggestion = f' (did you mean "{close[0]}"?)' if close else ""
            error(
                ("cron", name, "task"),
                f'no task named "{entry.task}": neither registered by a module in imports '
                f"nor defined under tasks:{suggestion}",
            )
    warnings = [exposed] if (exposed := exposed_password(path)) else []
    for name, entry in settings.cron.items():
        queue = settings.queues.get(entry.queue)
        if queue is not None and queue.processes == 0:
            warnings.append(
                f'cron.{name}: queue "{entry.queue}" has no worker processes on this node'
            )
    for spec in tasks.registry.specs():
        if spec.queue not in settings.queues:
            warnings.append(
                f'task "{spec.name}" is declared with queue "{spec.queue}", which is not '
                "configured here: jobs enqueued without a queue go there, and no worker on "
                "this node serves it"
            )
    return [message for _, message in sorted(problems, key=lambda p: p[0])], warnings


def exposed_password(path: str) -> str | None:
    """A warning when the config file holds a password and users other than its owner and
    group may read it; None otherwise."""
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    if not mode & stat.S_IROTH or not any(_PASSWORD.search(line) for line in lines):
        return None
    return (
        f"{path} holds a database password and every user on this host can read it: "
        f"chmod o-r {path}, or move the password to ${{JOBQD_DATABASE_URL}} or ~/.pgpass"
    )


def start(path: str, hint: str = "", *, migrate: bool = True) -> int:
    """Load the config and run the master until it stops; returns the exit code."""
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"jobqd: not starting: configuration file {path} is invalid{hint}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log.format, settings.log.level, role="master")
    exposed = exposed_password(path)
    if exposed:
        log.warning("%s", exposed)
    from jobqd.daemon.supervisor import Supervisor

    supervisor = Supervisor(
        settings, config_path=path, migrate=migrate and settings.database.migrate
    )
    try:
        return supervisor.run()
    except DatabaseUnavailable as exc:  # the embedded server could not be started
        log.error("%s", exc)
        return EXIT_UNREACHABLE

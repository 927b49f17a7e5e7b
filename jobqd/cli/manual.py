"""The manual: jobqd(8), jobqctl(1), jobqd.yaml(5) and docs/configuration.md, rendered from
the argument parsers and the configuration reference, so that none of them can drift.

    python -m jobqd.cli.manual --out DIR           # the three roff pages
    python -m jobqd.cli.manual --markdown FILE     # the configuration reference for docs/

The options come from jobqd.cli.daemon.build_parser and jobqd.cli.ctl.build_parser, the
settings from jobqd.config.reference; only the sections no parser knows (signals, exit
status, files) are written here. `undocumented()` lists what has no text yet.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from jobqd import __version__
from jobqd.cli import ctl, daemon
from jobqd.config import reference

PAGES = ("jobqd.8", "jobqctl.1", "jobqd.yaml.5")

_DAEMON_SECTIONS = {
    "SIGNALS": [
        "TERM, INT: drain. Workers stop claiming, running jobs get shutdown_timeout to finish, "
        "the rest are released to their queues, then the master exits 0.",
        "QUIT: stop fast. Running jobs are released at once.",
        "HUP: reload the configuration file. Only the children whose settings changed are "
        "replaced; an invalid file is logged and the old configuration stays.",
    ],
    "EXIT STATUS": [
        "0: a clean stop, or a configuration that passed --check.",
        "1: an unexpected error, a failed --check, an http.listen that cannot be bound, or a "
        "failed migration.",
        "2: a usage error.",
        "3: the embedded database cannot start.",
        "4: no worker could boot (a task module fails to import).",
        "78: the configuration is invalid (EX_CONFIG), or the database sits behind a "
        "transaction-mode pooler; restarting cannot help.",
    ],
    "ENVIRONMENT": [
        "JOBQD_CONFIG: the configuration file when -c is not given.",
        "JOBQD_DATABASE_URL: the database when the file does not name one (database.url).",
        "JOBQD_HTTP_TOKEN: the bearer token of the HTTP API (http.token_env names it).",
        "JOBQD_HEALTH_FILE: a file the master rewrites every few seconds and removes when it "
        "stops, read by --health (the container image sets /run/jobqd/health).",
        "NOTIFY_SOCKET, WATCHDOG_USEC: set by systemd for Type=notify and WatchdogSec=.",
    ],
    "FILES": [
        "/etc/jobqd.yaml: the configuration (jobqd.yaml(5)).",
        "/etc/jobqd/jobqd.env: secrets for the systemd units, e.g. JOBQD_DATABASE_URL.",
        "/lib/systemd/system/jobqd.service, jobqd@.service: the units.",
    ],
    "SEE ALSO": ["jobqctl(1), jobqd.yaml(5), systemd.service(5)"],
}

_CTL_SECTIONS = {
    "EXIT STATUS": [
        "0: done.",
        "1: not found, nothing matched, or the database refused.",
        "2: a usage error, or an invalid configuration file.",
        "3: the database cannot be reached within --wait.",
        "130: interrupted.",
    ],
    "ENVIRONMENT": [
        "JOBQD_DATABASE_URL: the database, when neither -c nor --dsn is given.",
        "PGPASSFILE, PGSSLMODE and the other libpq variables apply to every connection.",
    ],
    "FILES": ["/etc/jobqd.yaml: read when no other database is given."],
    "SEE ALSO": ["jobqd(8), jobqd.yaml(5), psql(1)"],
}

_CONFIG_INTRO = [
    "jobqd reads one YAML file, by default /etc/jobqd.yaml (jobqd -c FILE for another). "
    "Unknown keys are errors; `jobqd -c FILE --check` prints every problem as "
    "FILE:LINE: key: message.",
    "Durations: 500ms, 30s, 5m, 1h, 1d, 1h30m, or a bare number of seconds. Sizes: 512KB "
    "(powers of 1000), 1MiB (powers of 1024), or a bare number of bytes. A key set to null, "
    "or left out, takes its default.",
    "${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?message} read the environment; $$ is "
    "a literal $. An unquoted ${VAR} takes the type of its value; quote it to keep a string.",
    "In the keys below, * stands for the name of a queue, task or cron entry: 1 to 100 "
    "letters, digits, or _ . : -.",
]


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_help(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help for a in action._choices_actions}
    return {}


def undocumented() -> list[str]:
    """Every flag, command and setting without a text: what the drift test wants empty."""
    missing: list[str] = []
    for name, parser in (("jobqd", daemon.build_parser()), ("jobqctl", ctl.build_parser())):
        for action in _options(parser):
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {_invocation(action)}")
        for command, sub in commands(parser).items():
            if not _command_help(parser).get(command):
                missing.append(f"{name} {command}")
            for action in _options(sub):
                if not action.help or action.help == argparse.SUPPRESS:
                    missing.append(f"{name} {command} {_invocation(action)}")
    try:
        reference.settings()
    except reference.UndocumentedSetting as exc:
        missing.append(str(exc))
    missing += [f"{key}: a text for a setting that does not exist" for key in _stray_texts()]
    return missing


def _stray_texts() -> list[str]:
    known = set(reference.dotted_keys())
    return sorted((set(reference.TEXT) | set(reference.DEFAULT_TEXT)) - known)


# -- roff ------------------------------------------------------------------------------------


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and minus signs escaped, no leading control
    character, `code` in bold."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    return "\n".join("\\&" + line if line[:1] in ".'" else line for line in text.split("\n"))


def _metavar(action: argparse.Action) -> str:
    if action.metavar:
        return str(action.metavar)
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        name = _metavar(action)
        if action.nargs in ("*", "?"):
            return f"[{name}]" if action.nargs == "?" else f"[{name} ...]"
        return f"{name} ..." if action.nargs == "+" else name
    flags = ", ".join(action.option_strings)
    return flags if action.nargs == 0 else f"{flags} {_metavar(action)}"


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": prog}
    if action.choices and action.option_strings and "{" not in _invocation(action):
        text += " (" + ", ".join(map(str, action.choices)) + ")"
    return text


def _usage(parser: argparse.ArgumentParser, actions: list[argparse.Action] | None = None) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)
    shown = parser._actions if actions is None else actions
    formatter.add_usage(parser.usage, shown, parser._mutually_exclusive_groups, "")
    return " ".join(formatter.format_help().split())


def _header(name: str, section: int, title: str, summary: str, manual: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "" "jobqd {__version__}" "{manual}"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(summary)}",
        ".SH SYNOPSIS",
        ".nf",
        roff(title),
        ".fi",
    ]


def _option_list(actions: Iterable[argparse.Action], prog: str) -> list[str]:
    lines = []
    for action in actions:
        lines += [".TP", f"\\fB{roff(_invocation(action))}\\fR", roff(_help(action, prog))]
    return lines


def _paragraphs(sections: dict[str, list[str]]) -> list[str]:
    lines = []
    for title, items in sections.items():
        lines.append(f".SH {title}")
        for item in items:
            head, colon, rest = item.partition(": ")
            if colon and title != "SEE ALSO":
                lines += [".TP", f"\\fB{roff(head)}\\fR", roff(rest)]
            else:
                lines += [".PP", roff(item)]
    return lines


def render_jobqd() -> str:
    parser = daemon.build_parser()
    lines = _header(
        "jobqd", 8, _usage(parser), "the jobqd job queue daemon", "System Administration"
    )
    lines += [".SH DESCRIPTION", roff(parser.description or "")]
    lines += [".SH OPTIONS", *_option_list(_options(parser), "jobqd")]
    lines += _paragraphs(_DAEMON_SECTIONS)
    return "\n".join(lines) + "\n"


def render_jobqctl() -> str:
    parser = ctl.build_parser()
    lines = _header(
        "jobqctl",
        1,
        "jobqctl [OPTIONS] COMMAND [ARGS]",
        "look at jobqd's queues and act on them",
        "User Commands",
    )
    lines += [".SH DESCRIPTION", roff(parser.description or "")]
    if parser.epilog:
        lines += [".PP", roff(parser.epilog)]
    top = _options(parser)
    common = {a.dest for a in top}
    lines += [
        ".SH OPTIONS",
        ".PP",
        "These options are accepted before or after the command.",
        *_option_list(top, "jobqctl"),
    ]
    lines.append(".SH COMMANDS")
    helps = _command_help(parser)
    for name, sub in commands(parser).items():
        own = [a for a in _options(sub) if a.dest not in common and a.dest != "help"]
        lines += [".SS " + roff(name), ".PP", f"\\fB{roff(_usage(sub, own))}\\fR", ".PP"]
        lines.append(roff(helps.get(name) or ""))
        lines += _option_list(own, f"jobqctl {name}")
    lines += _paragraphs(_CTL_SECTIONS)
    return "\n".join(lines) + "\n"


def _setting_line(setting: reference.Setting) -> str:
    """`kind; default X`, `kind; required`, or a section's bare kind."""
    if setting.default is not None:
        return f"{setting.kind}; default {setting.default}"
    return setting.kind if setting.section else f"{setting.kind}; required"


def render_config() -> str:
    lines = _header(
        "jobqd.yaml", 5, "/etc/jobqd.yaml", "the jobqd configuration file", "File Formats"
    )
    lines.append(".SH DESCRIPTION")
    for paragraph in _CONFIG_INTRO:
        lines += [".PP", roff(paragraph)]
    lines.append(".SH SETTINGS")
    settings = reference.settings()
    top = [s for s in settings if "." not in s.key and not s.section]
    for setting in top + [s for s in settings if s not in top]:
        if setting.section and "." not in setting.key:
            lines.append(".SS " + roff(setting.key))
        lines += [
            ".TP",
            f"\\fB{roff(setting.key)}\\fR ({roff(_setting_line(setting))})",
            roff(setting.text),
        ]
    lines += [
        ".SH FILES",
        ".TP",
        "\\fB/etc/jobqd.yaml\\fR",
        "The configuration of jobqd.service; jobqd@NAME.service reads /etc/jobqd/NAME.yaml.",
        ".SH SEE ALSO",
        ".PP",
        "jobqd(8), jobqctl(1)",
    ]
    return "\n".join(lines) + "\n"


# -- markdown --------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(setting: reference.Setting) -> str:
    if setting.default is None:
        default = "—" if setting.section else "required"
    else:
        default = f"`{_cell(setting.default)}`"
    return f"| `{setting.key}` | {_cell(setting.kind)} | {default} | {_cell(setting.text)} |"


def render_markdown() -> str:
    """docs/configuration.md: the top-level keys in one table, then a table per section."""
    table = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    intro = [p.replace("*", "`*`", 1) for p in _CONFIG_INTRO]
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m jobqd.cli.manual --markdown docs/configuration.md` from",
        "     jobqd/config/reference.py and jobqd/config/settings.py: edit those, not this. -->",
        "",
        *(line for paragraph in intro for line in (paragraph, "")),
        "`etc/jobqd.yaml` holds the same keys as a commented file; `man 5 jobqd.yaml` shows this",
        "reference once the package is installed.",
        "",
        "## Top-level keys",
        "",
        *table,
    ]
    settings = reference.settings()
    lines += [_row(s) for s in settings if "." not in s.key and not s.section]
    for setting in settings:
        if "." in setting.key or not setting.section:
            continue
        default = "" if setting.default is None else f" Default: `{setting.default}`."
        lines += ["", f"## `{setting.key}`", "", f"{setting.text}{default}", "", *table]
        lines += [_row(s) for s in settings if s.key.startswith(setting.key + ".")]
    return "\n".join(lines) + "\n"


def write(out: Path) -> list[Path]:
    """The three pages into directory `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in zip(PAGES, (render_jobqd(), render_jobqctl(), render_config()), strict=True):
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobqd.cli.manual",
        description="Render jobqd's man pages and configuration reference.",
    )
    parser.add_argument("--out", metavar="DIR", type=Path, help="write the three man pages here")
    parser.add_argument("--markdown", metavar="FILE", type=Path, help="write the reference here")
    args = parser.parse_args(argv)
    if not args.out and not args.markdown:
        parser.error("give --out DIR, --markdown FILE, or both")
    missing = undocumented()
    if missing:
        print("jobqd.cli.manual: these have no text yet:", *missing, sep="\n  ", file=sys.stderr)
        return 1
    if args.out:
        for path in write(args.out):
            print(path)
    if args.markdown:
        args.markdown.write_text(render_markdown(), encoding="utf-8")
        print(args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

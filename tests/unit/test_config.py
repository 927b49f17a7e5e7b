"""Config: YAML in, frozen settings or every problem as FILE:LINE: key.path: message out."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest

from jobqd.config.durations import format_duration, parse_duration, parse_size
from jobqd.config.settings import (
    ConfigError,
    FrozenDict,
    InvalidSetting,
    QueueSettings,
    Settings,
    load,
    parse,
)
from jobqd.config.yamlload import LoadError
from jobqd.config.yamlload import load as load_yaml

REFERENCE = Path(__file__).resolve().parents[2] / "etc" / "jobqd.yaml"

FULL = """\
version: 1
database:
  url: postgresql://db.example/app
  schema: app_jobs
  data_dir: /srv/pg
  migrate: false
  statement_timeout: 10s
  application_name: app
imports: [myapp.tasks, myapp.more]
shutdown_timeout: 1m
log: {format: json, level: debug}
queues:
  default: {}
  emails:
    processes: 3
    concurrency: 50
    lease: 1m
    heartbeat: 15s
    poll_interval: 250ms
    max_attempts: 5
    backoff: {kind: fixed, base: 10s, cap: 10s, jitter: 0}
    timeout: 2m
    grace: 5s
    delivery: at_most_once
    max_jobs_per_process: 1000
    max_memory: 512MiB
    completion_batch: 10
    completion_interval: 2ms
    retention: {succeeded: 1h}
    aging: {after: 10m, every: 30s, step: 2, floor: -50}
tasks:
  reports.render:
    command: [/usr/bin/render, --user, "{user_id}"]
    env: {LANG: C.UTF-8}
    cwd: /tmp
    timeout: 30s
    queue: emails
    max_attempts: 2
cron:
  nightly-report:
    schedule: "0 3 * * *"
    timezone: Europe/Berlin
    task: reports.render
    queue: emails
    args: {user_id: 7, tags: [a, b]}
    priority: -5
    enabled: false
    misfire: all
    misfire_window: 2h
  every-5s:
    schedule: "*/5 * * * * *"
    task: jobqd.examples.tick
retention: {succeeded: 2d, dead: 30d, idempotency: 12h}
reaper: {interval: 10s, process_grace: 1m, batch: 500}
maintenance: {interval: 2s, standby_retry: 5s}
http: {listen: "127.0.0.1:9187", token_env: MY_TOKEN, max_body: 64KB}
"""


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, "jobqd.yaml", env or {})
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


def test_full_config_reads_every_key() -> None:
    settings = parse(FULL, "full.yaml", {})
    db = settings.database
    assert (db.url, db.schema, db.data_dir, db.migrate) == (
        "postgresql://db.example/app",
        "app_jobs",
        "/srv/pg",
        False,
    )
    assert (db.statement_timeout, db.application_name, db.is_embedded) == (10.0, "app", False)
    assert settings.imports == ("myapp.tasks", "myapp.more")
    assert settings.shutdown_timeout == 60.0
    assert (settings.log.format, settings.log.level) == ("json", "debug")
    assert settings.queues["default"] == QueueSettings()
    emails = settings.queues["emails"]
    assert (emails.processes, emails.concurrency, emails.lease, emails.heartbeat) == (3, 50, 60, 15)
    assert (emails.poll_interval, emails.max_attempts) == (0.25, 5)
    assert (emails.backoff.kind, emails.backoff.base, emails.backoff.cap) == ("fixed", 10, 10)
    assert emails.backoff.jitter == 0.0
    assert (emails.timeout, emails.grace, emails.delivery) == (120, 5, "at_most_once")
    assert (emails.max_jobs_per_process, emails.max_memory) == (1000, 512 * 2**20)
    assert (emails.completion_batch, emails.completion_interval) == (10, 0.002)
    assert (emails.aging.after, emails.aging.every, emails.aging.step) == (600, 30, 2)
    assert emails.aging.floor == -50
    task = settings.tasks["reports.render"]
    assert task.command == ("/usr/bin/render", "--user", "{user_id}")
    assert (dict(task.env), task.cwd, task.timeout, task.queue, task.max_attempts) == (
        {"LANG": "C.UTF-8"},
        "/tmp",
        30,
        "emails",
        2,
    )
    nightly = settings.cron["nightly-report"]
    assert (nightly.schedule, nightly.timezone, nightly.task, nightly.queue) == (
        "0 3 * * *",
        "Europe/Berlin",
        "reports.render",
        "emails",
    )
    assert json.loads(json.dumps(nightly.args)) == {"user_id": 7, "tags": ["a", "b"]}
    assert (nightly.priority, nightly.enabled, nightly.misfire, nightly.misfire_window) == (
        -5,
        False,
        "all",
        7200,
    )
    assert str(nightly.tzinfo) == "Europe/Berlin"
    tick = settings.cron["every-5s"]
    assert (tick.queue, tick.timezone, tick.misfire) == ("default", "UTC", "skip")
    r = settings.retention
    assert (r.succeeded, r.dead, r.idempotency) == (2 * 86400, 30 * 86400, 12 * 3600)
    emails = settings.queues["emails"].retention
    assert (emails.succeeded, emails.dead) == (3600, None)  # None: the top-level value
    assert (settings.reaper.interval, settings.reaper.process_grace) == (10, 60)
    assert settings.reaper.batch == 500
    assert (settings.maintenance.interval, settings.maintenance.standby_retry) == (2, 5)
    http = settings.http
    assert (http.listen, http.host, http.port) == ("127.0.0.1:9187", "127.0.0.1", 9187)
    assert (http.token_env, http.max_body) == ("MY_TOKEN", 64_000)
    assert settings.source == "full.yaml"


def test_empty_config_is_one_default_queue_on_embedded_postgres() -> None:
    settings = parse("", env={})
    assert settings == Settings.default(env={})
    assert list(settings.queues) == ["default"]
    default = settings.queues["default"]
    assert (default.processes, default.concurrency, default.lease, default.heartbeat) == (
        1,
        8,
        30,
        10,
    )
    assert settings.database.is_embedded and settings.database.schema == "jobqd"
    assert settings.database.data_dir.endswith("jobqd/pgdata")
    assert settings.http.listen is None and settings.http.port is None
    assert (settings.tasks, settings.cron) == ({}, {})


def test_database_url_defaults_to_the_environment_and_has_a_shorthand() -> None:
    env = {"JOBQD_DATABASE_URL": "postgresql:///fromenv"}
    assert parse("", env=env).database.url == "postgresql:///fromenv"
    assert parse("log: {level: info}", env=env).database.url == "postgresql:///fromenv"
    assert parse("database:", env=env).database.url == "postgresql:///fromenv"
    assert parse("database: postgresql:///short", env=env).database.url == "postgresql:///short"
    assert parse("database: embedded", env=env).database.is_embedded


def test_reference_config_parses_to_the_defaults() -> None:
    assert load(REFERENCE, env={}) == Settings.default(env={})
    assert load(REFERENCE, env={}).source == str(REFERENCE)


def test_reference_config_examples_parse_when_uncommented() -> None:
    text = REFERENCE.read_text().replace("tasks: {}", "tasks:").replace("cron: {}", "cron:")
    settings = parse(re.sub(r"(?m)^# {3}", "  ", text), "etc/jobqd.yaml", {})
    assert settings.tasks["reports.render"].command[-1] == "{user_id}"
    assert settings.cron["tick"].task == "jobqd.examples.tick"


def test_bad_duration_names_file_line_and_key() -> None:
    text = "queues:\n  emails:\n    lease: thirty\n"
    assert errors_of(text) == [
        "jobqd.yaml:3: queues.emails.lease: expected a duration like 500ms, 30s, 5m, 1h, 1d, "
        'got "thirty"'
    ]


def test_unknown_key_suggests_the_close_one() -> None:
    assert errors_of("queues:\n  emails:\n    concurency: 4\n") == [
        'jobqd.yaml:3: queues.emails.concurency: unknown key (did you mean "concurrency"?)'
    ]
    assert errors_of("colour: blue\n") == ["jobqd.yaml:1: colour: unknown key"]


def test_duplicate_key_is_an_error() -> None:
    assert errors_of("queues:\n  emails:\n    lease: 1m\n    lease: 2m\n") == [
        "jobqd.yaml:4: queues.emails.lease: duplicate key (first at line 3)"
    ]


def test_malformed_yaml_names_line_column_and_problem() -> None:
    (error,) = errors_of("queues:\n  emails: {lease: 1m\nhttp: {}\n")
    assert error.startswith("jobqd.yaml:3:5: ")
    assert "expected ',' or '}'" in error


def test_environment_interpolation() -> None:
    text = (
        "database:\n"
        "  url: postgresql://u:${PASSWORD}@h/db\n"
        "  schema: ${SCHEMA:-jobs}\n"
        "  application_name: ${EMPTY-unset}$$x\n"
        "queues:\n"
        "  default:\n"
        "    concurrency: ${WORKERS:-8}\n"
    )
    env = {"PASSWORD": "s3cret", "EMPTY": "", "WORKERS": "12"}
    settings = parse(text, env=env)
    assert settings.database.url == "postgresql://u:s3cret@h/db"
    assert settings.database.schema == "jobs"
    assert settings.database.application_name == "$x"
    assert settings.queues["default"].concurrency == 12
    assert parse(text, env={"PASSWORD": "p"}).queues["default"].concurrency == 8


def test_missing_environment_variable_names_line_and_variable() -> None:
    assert errors_of("database:\n  url: ${DB_URL}\nhttp:\n  token_env: ${X:?set X please}\n") == [
        "jobqd.yaml:2: database.url: environment variable DB_URL is not set "
        "(write ${DB_URL:-default} to give a default)",
        "jobqd.yaml:4: http.token_env: set X please",
    ]


def test_interpolation_inside_flow_collections() -> None:
    """`{` and `}` are structure in a flow mapping: the references still work there."""
    text = (
        "database: {url: ${DATABASE_URL}, schema: ${SCHEMA:-jobs}}\n"
        "imports: [${APP}.tasks, other.tasks]\n"
        'queues: {default: {concurrency: ${N:-8}, lease: "${LEASE}"}}\n'
    )
    env = {"DATABASE_URL": "postgresql://u:s3cret@h/db", "APP": "myapp", "N": "3", "LEASE": "1m"}
    settings = parse(text, env=env)
    assert settings.database.url == "postgresql://u:s3cret@h/db"
    assert settings.database.schema == "jobs"
    assert settings.imports == ("myapp.tasks", "other.tasks")
    assert settings.queues["default"].concurrency == 3  # unquoted: typed
    assert settings.queues["default"].lease == 60.0
    assert load_yaml("a: {k${N}: [${N}]}", env={"N": "1"}).data == {"a": {"k${N}": [1]}}


def test_unset_variable_in_a_flow_mapping_names_it_and_the_key_never_a_value() -> None:
    errors = errors_of("database: {url: ${DATABASE_URL}}\nimports: [${APP}]\n", {"X": "s3cret"})
    assert errors == [
        "jobqd.yaml:1: database.url: environment variable DATABASE_URL is not set "
        "(write ${DATABASE_URL:-default} to give a default)",
        "jobqd.yaml:2: imports[0]: environment variable APP is not set "
        "(write ${APP:-default} to give a default)",
    ]


def test_a_word_like_the_mask_in_the_text_is_left_alone() -> None:
    text = "database: {application_name: jobqdref0z, schema: ${S}}\n"
    settings = parse(text, env={"S": "s"})
    assert (settings.database.application_name, settings.database.schema) == ("jobqdref0z", "s")


def test_pythonpath_is_relative_to_the_config_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "conf" / "jobqd.yaml"
    path.parent.mkdir()
    path.write_text("imports: [app.tasks]\npythonpath: [src, ../lib, /opt/x]\n")
    monkeypatch.chdir(tmp_path)
    settings = load(path, env={})
    here = str(path.parent)
    assert settings.pythonpath == (f"{here}/src", f"{tmp_path}/lib", "/opt/x")
    assert settings.import_path() == (*settings.pythonpath, str(tmp_path), here)
    assert errors_of("pythonpath: src\n") == [
        'jobqd.yaml:1: pythonpath: expected a list of directories, got "src"'
    ]


def test_quoted_interpolation_stays_a_string() -> None:
    assert errors_of('queues: {default: {concurrency: "${N}"}}', {"N": "8"}) == [
        'jobqd.yaml:1: queues.default.concurrency: expected an integer, got "8"'
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('queues: {q: {concurrency: "8"}}', 'queues.q.concurrency: expected an integer, got "8"'),
        ("queues: {q: {concurrency: true}}", "queues.q.concurrency: expected an integer, got true"),
        (
            "queues: {q: {concurrency: 0}}",
            "queues.q.concurrency: must be between 1 and 1000, got 0",
        ),
        ("queues: {q: {processes: -1}}", "queues.q.processes: must be at least 0, got -1"),
        ("queues: {q: {lease: 500ms}}", 'queues.q.lease: must be at least 1s, got "500ms"'),
        ("queues: {q: {backoff: {jitter: 2}}}", "queues.q.backoff.jitter: expected a number from"),
        ("queues: {q: {backoff: {base: 1m, cap: 1s}}}", "queues.q.backoff.cap: cap 1s is less"),
        ("queues: {q: {max_memory: lots}}", "queues.q.max_memory: expected a size like 512KiB"),
        ("queues: {q: {delivery: twice}}", "queues.q.delivery: expected one of at_least_once"),
        ("queues: [a, b]", "queues: expected a mapping, got a list"),
        ('queues: {"bad name": {}}', "queues.bad name: a name is 1 to 100 letters"),
        ("database: {schema: Jobs}", "database.schema: expected a lower-case SQL identifier"),
        ("database: {migrate: yes please}", "database.migrate: expected true or false"),
        ("imports: myapp.tasks", 'imports: expected a list of module names, got "myapp.tasks"'),
        ("imports: [my-app]", "imports: expected a dotted module name like myapp.tasks"),
        ("log: {format: xml}", 'log.format: expected one of auto, json, text, got "xml"'),
        ("http: {listen: 9187}", "http.listen: expected a string, got 9187"),
        ("http: {listen: 'localhost:0'}", "http.listen: port must be between 1 and 65535, got 0"),
        ("tasks: {t: {}}", 't: missing required key "command"'),
        ("tasks: {t: {command: []}}", "tasks.t.command: expected a non-empty list"),
        ("tasks: {t: {command: [echo, '{}']}}", "tasks.t.command: placeholder {} in"),
        ("tasks: {t: {command: [echo, '{x']}}", 'tasks.t.command: bad placeholder in "{x"'),
        ("tasks: {t: {command: [x], env: {PORT: 80}}}", "tasks.t.env: PORT: expected a string"),
        ("cron: {c: {schedule: '@daily', task: t, args: [1]}}", "cron.c.args: expected a mapping"),
        ("cron: {c: {schedule: '@daily', task: t, priority: 1.5}}", "cron.c.priority: expected an"),
        ("version: 2", "version: must be between 1 and 1, got 2"),
    ],
)
def test_type_and_range_errors(text: str, message: str) -> None:
    (error,) = errors_of(text)
    assert error.startswith("jobqd.yaml:1: ") and message in error, error


def test_cron_and_task_queues_must_be_configured() -> None:
    text = (
        "queues: {emails: {}}\n"
        "tasks: {t: {command: [x]}}\n"
        "cron: {c: {schedule: '@hourly', task: t, queue: emial}}\n"
    )
    assert errors_of(text) == [
        'jobqd.yaml:2: tasks.t.queue: unknown queue "default"',
        'jobqd.yaml:3: cron.c.queue: unknown queue "emial" (did you mean "emails"?)',
    ]


def test_lease_must_span_three_heartbeats() -> None:
    assert errors_of("queues:\n  q:\n    lease: 2s\n    heartbeat: 1s\n") == [
        "jobqd.yaml:4: queues.q.heartbeat: lease 2s is shorter than 3 heartbeats of 1s"
    ]
    with pytest.raises(InvalidSetting):
        QueueSettings(lease=2.0, heartbeat=1.0)
    assert QueueSettings(lease=60.0).heartbeat == 20.0


def test_child_timeout_must_outlast_a_statement() -> None:
    assert errors_of("database: {statement_timeout: 2m}\nchild_timeout: 1m\n") == [
        "jobqd.yaml:2: child_timeout: 1m is not longer than database.statement_timeout 2m: "
        "a child waiting on a slow statement would be killed as hung; raise child_timeout"
    ]
    (error,) = errors_of("database: {statement_timeout: 3m}\n")
    assert "child_timeout: 2m is not longer than database.statement_timeout 3m" in error


@pytest.mark.parametrize("schedule", ["0 3 * *", "0 25 * * *", "* * * * * * *", "@reboot", "x"])
def test_bad_cron_expression(schedule: str) -> None:
    (error,) = errors_of(f"cron: {{c: {{schedule: '{schedule}', task: t}}}}")
    assert error.startswith("jobqd.yaml:1: cron.c.schedule: ")
    assert json.dumps(schedule) in error


def test_bad_timezone() -> None:
    assert errors_of("cron:\n  c: {schedule: '@daily', task: t, timezone: Mars/Olympus}\n") == [
        'jobqd.yaml:2: cron.c.timezone: unknown time zone "Mars/Olympus"'
    ]


def test_every_problem_is_reported_in_line_order() -> None:
    text = (
        "shutdown_timeout: soon\n"  # 1
        "queues:\n"
        "  emails:\n"
        "    concurency: 4\n"  # 4
        "    lease: thirty\n"  # 5
        "cron:\n"
        "  c: {schedule: '61 * * * *', task: t, queue: nope}\n"  # 7
        "http: {listen: nowhere}\n"  # 8
    )
    errors = errors_of(text)
    assert [int(e.split(":")[1]) for e in errors] == [1, 4, 5, 7, 7, 8]
    assert [e.split(": ")[1] for e in errors] == [
        "shutdown_timeout",
        "queues.emails.concurency",
        "queues.emails.lease",
        "cron.c.schedule",
        "cron.c.queue",
        "http.listen",
    ]


def test_settings_are_immutable_hashable_and_comparable() -> None:
    settings = parse(FULL, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.queues["emails"].lease = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.queues["new"] = QueueSettings()
    with pytest.raises(TypeError):
        settings.cron["nightly-report"].args["user_id"] = 8
    assert isinstance(settings.queues, FrozenDict)
    assert hash(settings) == hash(parse(FULL, env={}))
    assert pickle.loads(pickle.dumps(settings)) == settings
    changed = parse(FULL.replace("concurrency: 50", "concurrency: 60"), env={})
    assert changed.queues["emails"] != settings.queues["emails"]
    assert changed.queues["default"] == settings.queues["default"]


def test_load_reports_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "missing.yaml", env={})
    assert caught.value.errors == [
        f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    ]


def test_yaml_lines_anchors_and_recursive_aliases() -> None:
    document = load_yaml("base: &b {a: 1}\nq:\n  <<: *b\n  c: [x, y]\n", "f", {})
    assert document.data == {"base": {"a": 1}, "q": {"a": 1, "c": ["x", "y"]}}
    assert document.line(("q", "c", 0)) == 4
    assert document.line(("q", "missing", "deeper")) == 2
    with pytest.raises(
        LoadError, match="f:1: a\\[0\\]: an alias refers to a node that contains it"
    ):
        load_yaml("a: &x [*x]\n", "f", {})


def test_durations_and_sizes() -> None:
    assert [parse_duration(v) for v in ("500ms", "30s", "5m", "1h", "1d", "1h30m", "1.5s")] == [
        0.5,
        30,
        300,
        3600,
        86400,
        5400,
        1.5,
    ]
    assert parse_duration(7) == 7.0 and parse_duration("60") == 60.0
    for bad in ("thirty", "", "-5s", "5s1m", True, -1, float("inf")):
        with pytest.raises(ValueError):
            parse_duration(bad)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match='expected a duration like 500ms, 30s, 5m, 1h, 1d, got "thirty"'
    ):
        parse_duration("thirty")
    assert [parse_size(v) for v in ("512KB", "1MiB", "1MB", "1GiB", 42)] == [
        512_000,
        2**20,
        10**6,
        2**30,
        42,
    ]
    with pytest.raises(ValueError):
        parse_size("1 potato")
    for seconds, text in [(0, "0s"), (0.005, "5ms"), (1.5, "1.5s"), (90, "1m30s"), (86400, "1d")]:
        assert format_duration(seconds) == text
        assert parse_duration(text) == seconds

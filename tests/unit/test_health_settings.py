"""The database_health config keys and jobqctl's retry schedule, without a database."""

from __future__ import annotations

import pytest

from jobqd.cli.ctl import _transient, retry_delays
from jobqd.config.settings import ConfigError, DatabaseHealthSettings, parse


def test_database_health_defaults_and_values():
    assert parse("", "jobqd.yaml", {}).database_health == DatabaseHealthSettings(
        holder_age=300.0, holder_xid_age=1_000_000, dead_tuples=100_000
    )
    text = "database_health: {holder_age: 90s, holder_xid_age: 5000, dead_tuples: 0}\n"
    assert parse(text, "jobqd.yaml", {}).database_health == DatabaseHealthSettings(90.0, 5000, 0)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "database_health: {holder_age: soon}",
            "jobqd.yaml:1: database_health.holder_age: expected a duration like 500ms",
        ),
        (
            "database_health: {holder_age: 0s}",
            "jobqd.yaml:1: database_health.holder_age: must be longer than 0s",
        ),
        (
            "database_health: {holder_xid_age: 0}",
            "jobqd.yaml:1: database_health.holder_xid_age: must be at least 1, got 0",
        ),
        (
            "database_health: {dead_tuples: -1}",
            "jobqd.yaml:1: database_health.dead_tuples: must be at least 0, got -1",
        ),
        (
            "database_health: {dead_tuple: 5}",
            'jobqd.yaml:1: database_health.dead_tuple: unknown key (did you mean "dead_tuples"?)',
        ),
    ],
)
def test_database_health_errors_name_the_key(text, error):
    with pytest.raises(ConfigError) as raised:
        parse(text + "\n", "jobqd.yaml", {})
    assert raised.value.errors[0].startswith(error), raised.value.errors


def test_retry_delays_double_up_to_the_cap_and_end_at_the_wait():
    assert retry_delays(0) == []
    assert retry_delays(5) == [0.5, 1.0, 2.0, 1.5]
    assert retry_delays(30) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 2.5]
    assert sum(retry_delays(3600)) == pytest.approx(3600)
    assert max(retry_delays(3600)) == 5.0


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        ('connection to server at "db", port 5432 failed: Connection refused', True),
        ('connection to server at "db", port 5432 failed: timeout expired', True),
        ('could not translate host name "db" to address', True),
        ("server closed the connection unexpectedly", True),
        ("failed: FATAL:  the database system is starting up", True),
        ("failed: FATAL:  the database system is shutting down", True),
        ("failed: FATAL:  sorry, too many clients already", True),
        ("failed: FATAL:  remaining connection slots are reserved for superuser", True),
        ('failed: FATAL:  password authentication failed for user "jobqd"', False),
        ('failed: FATAL:  database "jobs" does not exist', False),
        ('failed: FATAL:  no pg_hba.conf entry for host "10.0.0.7"', False),
    ],
)
def test_only_what_waiting_can_fix_is_retried(message, transient):
    assert _transient(Exception(message)) is transient

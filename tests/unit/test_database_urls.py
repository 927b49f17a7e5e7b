"""`jobqctl dsn`'s URL: what psql and libpq accept for any conninfo, without its password
unless asked, and the embedded server's URL read from its postmaster.pid."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from jobqd.store import embedded
from jobqd.store.connections import as_url, password_of


@pytest.mark.parametrize(
    ("dsn", "url"),
    [
        ("postgresql:///app", "postgresql:///app"),
        ("postgresql://u:pw@[::1]:5433/x", "postgresql://u@[::1]:5433/x"),
        (
            "host=db1,db2 port=5433 user=u password=p@ss dbname='my db' sslmode=require",
            "postgresql://u@db1:5433,db2:5433/my%20db?sslmode=require",
        ),
        (
            "postgresql://postgres:@/postgres?host=/run/a%20b&port=5432",
            "postgresql://postgres@/postgres?host=/run/a%20b&port=5432",
        ),
        (
            "user=a@b host=h dbname=x/y application_name=a&b=c",
            "postgresql://a%40b@h/x%2Fy?application_name=a%26b%3Dc",
        ),
    ],
)
def test_as_url_means_the_same_to_libpq_without_the_password(dsn, url):
    assert as_url(dsn) == url
    expected = conninfo_to_dict(dsn)
    expected.pop("password", None)
    got = conninfo_to_dict(url)
    if "," in expected.get("host", ""):  # one port for every host, written out for each
        expected["port"] = ",".join([expected["port"]] * len(expected["host"].split(",")))
    assert got == expected


def test_the_password_only_when_asked():
    dsn = "host=h user=u password='p@ss:/ word'"
    assert as_url(dsn, password=True) == "postgresql://u:p%40ss%3A%2F%20word@h/"
    assert conninfo_to_dict(as_url(dsn, password=True))["password"] == "p@ss:/ word"
    assert password_of(dsn) == "p@ss:/ word" and password_of("host=h") is None


def test_the_embedded_url_comes_from_postmaster_pid(tmp_path):
    data_dir = tmp_path / "pgdata"
    assert embedded.find(data_dir) is None  # no directory at all
    data_dir.mkdir()
    lines = ["{pid}", str(data_dir), "1700000000", "5432", "/run/x y", "", "0 0", "{status}"]
    pidfile = data_dir / "postmaster.pid"
    pidfile.write_text("\n".join(lines).format(pid=1, status="starting") + "\n")
    assert embedded.find(data_dir) is None  # not accepting connections yet
    pidfile.write_text("\n".join(lines).format(pid=1, status="ready") + "\n")
    assert embedded.find(data_dir) == "postgresql://postgres@/postgres?host=/run/x%20y&port=5432"
    pidfile.write_text("\n".join(lines).format(pid=2**22 + 1, status="ready") + "\n")
    assert embedded.find(data_dir) is None  # a stale file: no such process

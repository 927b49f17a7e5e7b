"""The dashboard over real HTTP (its own small server, as `jobqctl dashboard` runs it) against
a real database: pages, escaping, keyset paging, sign-in, CSRF, and every action."""

from __future__ import annotations

import base64
import http.client
import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from psycopg.types.json import Jsonb

from jobqd.config.settings import DashboardAuthSettings, parse
from jobqd.http import dashboard as web
from jobqd.http.dashboard import standalone
from jobqd.http.server import Sessions
from jobqd.store import browse

pytest.importorskip("jinja2", reason="the dashboard extra (jinja2) is not installed")

TOKEN = "s3cret-dashboard-token"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Client:
    """Plain HTTP to one dashboard, keeping its cookies like a browser would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(
        self, method: str, path: str, form: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form, doseq=True).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        text = response.read().decode()
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                cookie_value = rest.split(";", 1)[0]
                if "Max-Age=0" in value:
                    self.cookies.pop(key, None)
                else:
                    self.cookies[key] = cookie_value
        connection.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text

    def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, form: Any, **kwargs: Any) -> tuple[int, dict[str, str], str]:
        return self.request("POST", path, form=form, **kwargs)

    def csrf(self, path: str = "/dashboard/jobs") -> str:
        status, _, html = self.get(path)
        assert status == 200, html
        return _CSRF.search(html).group(1)


@pytest.fixture
def serve(dsn: str) -> Iterator[Any]:
    """Start a dashboard: serve(auth=None | DashboardAuthSettings, settings=None, env={})."""
    started: list[tuple[Any, Sessions, threading.Thread]] = []

    def start(
        auth: DashboardAuthSettings | None = None, settings: Any = None, env: Any = None
    ) -> Client:
        sessions = Sessions(dsn, application_name="jobqd-test")
        dashboard = web.Dashboard(
            web.Source("jobqd", settings), sessions.session, web.Auth(auth, env or {})
        )
        server = standalone.make_server(dashboard, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, sessions, thread))
        return Client(server.server_address[1])

    yield start
    for server, sessions, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)
        sessions.close()


def _enqueue(conn: psycopg.Connection, queue: str, task: str, args: str = "{}") -> int:
    row = conn.execute("SELECT jobqd.enqueue(%s, %s, %s::jsonb)", (queue, task, args)).fetchone()
    return row[0]


def _kill(conn: psycopg.Connection, job_id: int, error: str = "ValueError: boom") -> None:
    errors = '[{"attempt": 1, "kind": "ValueError", "message": "boom", "traceback": "Trace <tb>"}]'
    conn.execute(
        "UPDATE jobqd.jobs SET state = 'dead', finished_at = now(), attempt = 1,"
        " started_at = now(), last_error = %s, errors = %s::jsonb WHERE id = %s",
        (error, errors, job_id),
    )


def _state(conn: psycopg.Connection, job_id: int) -> str | None:
    row = conn.execute("SELECT state FROM jobqd.jobs WHERE id = %s", (job_id,)).fetchone()
    return row[0] if row else None


def test_pages_read_only_escape_user_data_and_refuse_posts(serve: Any, conn: psycopg.Connection):
    hostile = '{"to": "<script>alert(1)</script>"}'
    job_id = _enqueue(conn, "emails", "send", hostile)
    _kill(conn, job_id, "ValueError: <img src=x onerror=alert(1)>")
    client = serve()
    for path in ("/", "/jobs", "/jobs?state=dead", f"/jobs/{job_id}", "/processes", "/cron"):
        status, headers, html = client.get("/dashboard" + path)
        assert status == 200, (path, html)
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert "<script>alert" not in html and "<img src=x" not in html
        assert " style=" not in html and "<style" not in html  # nothing CSP would block
        assert "read-only" in html
    _, _, detail = client.get(f"/dashboard/jobs/{job_id}")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail
    assert "Trace &lt;tb&gt;" in detail  # the traceback, escaped
    _, _, overview = client.get("/dashboard/")
    assert ">emails</a>" in overview and "last hour" in overview
    # Read-only: every POST is refused before anything else, and nothing changes.
    status, _, html = client.post(f"/dashboard/jobs/{job_id}/retry", {"csrf": "x"})
    assert status == 403 and "read-only" in html
    status, _, _ = client.request("POST", f"/dashboard/jobs/{job_id}/delete")
    assert status == 403
    assert _state(conn, job_id) == "dead"
    assert client.get("/")[1]["location"] == "/dashboard/"
    status, _, html = client.get("/dashboard/jobs?state=bogus")
    assert status == 400 and "unknown state" in html


def test_keyset_pages_match_the_table_for_every_filter(conn: psycopg.Connection):
    ids = []
    for n in range(240):
        queue = ("a", "b", "c")[n % 3]
        ids.append(_enqueue(conn, queue, f"t{n % 4}", f'{{"n": {n}, "tag": "x{n % 7}"}}'))
    for job_id in ids[::5]:
        _kill(conn, job_id, f"KeyError: k{job_id % 3}")
    conn.execute("UPDATE jobqd.jobs SET state = 'cancelled', finished_at = now() WHERE id % 11 = 0")
    cases = [
        browse.Filters(),
        browse.Filters(queue="b"),
        browse.Filters(state="dead"),
        browse.Filters(state="dead", queue="a"),
        browse.Filters(state="cancelled"),
        browse.Filters(state="queued", task="t2"),
        browse.Filters(text="X3"),  # case-insensitive, in args
        browse.Filters(text="k1", state="dead"),  # in the last error
        browse.Filters(queue="c", text='"tag": "x5"'),
        browse.Filters(queue="nope"),
    ]
    for filters in cases:
        expected = _expected(conn, filters)
        for budget, slice_ids in ((10.0, 37), (0.0, 29)):
            seen, before, statements = [], None, 0
            while True:
                page = browse.jobs(
                    conn,
                    "jobqd",
                    filters,
                    before=before,
                    limit=20,
                    budget=budget,
                    slice_ids=slice_ids,
                )
                assert len(page.rows) <= 20
                seen += [row["id"] for row in page.rows]
                statements += page.statements
                if page.next_before is None:
                    break
                before = page.next_before
                assert statements < 500, "the pages do not move down"
            assert seen == expected, (filters, budget)


def _expected(conn: psycopg.Connection, filters: browse.Filters) -> list[int]:
    rows = conn.execute("SELECT id, queue, state, task, args::text, last_error FROM jobqd.jobs")
    found = []
    for job_id, queue, state, task, args, error in rows:
        if filters.queue and queue != filters.queue:
            continue
        if filters.state and state != filters.state:
            continue
        if filters.task and task != filters.task:
            continue
        text = (filters.text or "").lower()
        if text and text not in args.lower() and text not in (error or "").lower():
            continue
        found.append(job_id)
    return sorted(found, reverse=True)


def test_token_sign_in_csrf_and_origin(serve: Any, conn: psycopg.Connection):
    job_id = _enqueue(conn, "default", "work")
    _kill(conn, job_id)
    client = serve(DashboardAuthSettings(token_env="DASH_TOKEN"), env={"DASH_TOKEN": TOKEN})
    status, headers, _ = client.get("/dashboard/jobs")
    assert status == 303 and headers["location"].startswith("/dashboard/login")
    status, _, html = client.post("/dashboard/login", {"token": "wrong", "next": "/dashboard/"})
    assert status == 401 and "not the dashboard" in html and "jobqd_session" not in client.cookies
    status, _, _ = client.post(f"/dashboard/jobs/{job_id}/retry", {"csrf": "x"})
    assert status == 401  # not signed in
    status, headers, _ = client.post("/dashboard/login", {"token": TOKEN, "next": "//evil.example"})
    assert status == 303 and headers["location"] == "/dashboard/"  # never off-site
    assert "jobqd_session" in client.cookies
    csrf = client.csrf()
    # Signed in, but no CSRF token, a wrong one, or another site's Origin: refused.
    for form, extra in (
        ({}, {}),
        ({"csrf": csrf[:-2] + "xx"}, {}),
        ({"csrf": csrf}, {"Origin": "http://evil.example"}),
    ):
        status, _, html = client.post(f"/dashboard/jobs/{job_id}/retry", form, headers=extra)
        assert status == 403, html
    assert _state(conn, job_id) == "dead"
    origin = {"Origin": f"http://127.0.0.1:{client.port}"}
    form = {"csrf": csrf, "next": f"/dashboard/jobs/{job_id}"}
    status, headers, _ = client.post(f"/dashboard/jobs/{job_id}/retry", form, headers=origin)
    assert status == 303 and headers["location"] == f"/dashboard/jobs/{job_id}"
    assert _state(conn, job_id) == "queued"
    _, _, html = client.get(headers["location"])
    assert f"job {job_id} put back in line" in html  # the one-time notice
    assert "put back in line" not in client.get(headers["location"])[2]
    # A bearer token works for scripts; a session cookie from another key does not.
    bearer = Client(client.port)
    assert bearer.get("/dashboard/", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    forged = Client(client.port)
    forged.cookies["jobqd_session"] = "9999999999.abc.forged"
    assert forged.get("/dashboard/")[0] == 303
    status, _, _ = client.post("/dashboard/logout", {"csrf": csrf})
    assert status == 303 and "jobqd_session" not in client.cookies


def test_basic_auth_and_a_missing_secret(serve: Any, conn: psycopg.Connection):
    settings = DashboardAuthSettings(user_env="DASH_USER", password_env="DASH_PASSWORD")
    _enqueue(conn, "default", "work")
    client = serve(settings, env={"DASH_USER": "ops", "DASH_PASSWORD": "pw"})
    status, headers, _ = client.get("/dashboard/")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    wrong = base64.b64encode(b"ops:nope").decode()
    assert client.get("/dashboard/", headers={"Authorization": f"Basic {wrong}"})[0] == 401
    right = {"Authorization": "Basic " + base64.b64encode(b"ops:pw").decode()}
    status, _, html = client.get("/dashboard/jobs", headers=right)
    assert status == 200 and "signed in as ops" in html
    csrf = _CSRF.search(html).group(1)
    assert client.post("/dashboard/queues/default/pause", {}, headers=right)[0] == 403
    status, _, _ = client.post("/dashboard/queues/default/pause", {"csrf": csrf}, headers=right)
    assert status == 303
    assert conn.execute("SELECT paused FROM jobqd.queues WHERE name = 'default'").fetchone()[0]
    # Auth configured but its variable unset: nothing is shown, rather than an open dashboard.
    closed = serve(DashboardAuthSettings(token_env="DASH_UNSET"), env={})
    status, _, html = closed.get("/dashboard/")
    assert status == 503 and "DASH_UNSET" in html


def test_actions_change_the_database(serve: Any, conn: psycopg.Connection, dsn: str):
    settings = parse(
        f"database: {dsn}\n"
        "cron:\n  nightly:\n    schedule: '0 3 * * *'\n    task: reports.nightly\n"
    )
    client = serve(DashboardAuthSettings(token_env="T"), settings=settings, env={"T": TOKEN})
    client.post("/dashboard/login", {"token": TOKEN})
    csrf = client.csrf()
    dead = [_enqueue(conn, "mail", "send") for _ in range(3)]
    for job_id in dead:
        _kill(conn, job_id)
    queued = _enqueue(conn, "mail", "send")
    other = _enqueue(conn, "mail", "send")

    assert client.post(f"/dashboard/jobs/{queued}/cancel", {"csrf": csrf})[0] == 303
    assert _state(conn, queued) == "cancelled"
    client.post(f"/dashboard/jobs/{other}/delete", {"csrf": csrf})
    assert _state(conn, other) is None
    # Picked ids: two of the dead.
    client.post("/dashboard/jobs/retry", {"csrf": csrf, "id": [str(dead[0]), str(dead[1])]})
    assert [_state(conn, i) for i in dead] == ["queued", "queued", "dead"]
    # All of a queue in a state, as `jobqctl retry --queue mail --state dead` does.
    _, _, html = client.get("/dashboard/jobs?queue=mail&state=dead")
    assert "Retry all dead jobs of mail" in html
    form = {"csrf": csrf, "all": "1", "queue": "mail", "state": "dead"}
    client.post("/dashboard/jobs/retry", form)
    assert _state(conn, dead[2]) == "queued"
    _, headers, _ = client.post("/dashboard/jobs/retry", form)
    assert "nothing to retry" in client.get(headers["location"])[2]
    # Pause (also with a bad duration) and resume.
    _, headers, _ = client.post("/dashboard/queues/mail/pause", {"csrf": csrf, "duration": "soon"})
    assert "duration" in client.get(headers["location"])[2]
    client.post("/dashboard/queues/mail/pause", {"csrf": csrf})
    paused = "SELECT paused FROM jobqd.queues WHERE name = 'mail'"
    assert conn.execute(paused).fetchone()[0] is True
    _, _, overview = client.get("/dashboard/")
    assert "paused" in overview and "Resume" in overview
    client.post("/dashboard/queues/mail/resume", {"csrf": csrf})
    assert conn.execute(paused).fetchone()[0] is False
    # A timed pause ends by itself: the claim compares paused_until with the database's clock.
    client.post("/dashboard/queues/mail/pause", {"csrf": csrf, "duration": "10m"})
    left, by = conn.execute(
        "SELECT extract(epoch FROM paused_until - now()), paused_by FROM jobqd.queues"
        " WHERE name = 'mail'"
    ).fetchone()
    assert 590 < left <= 600 and by.startswith("dashboard (")
    client.post("/dashboard/queues/mail/resume", {"csrf": csrf})
    # A queue name that is not URL-safe is pausable too, through the overview's own form.
    _enqueue(conn, "team a/b", "x")
    _, _, overview = client.get("/dashboard/")
    assert 'action="/dashboard/queues/team%20a%2Fb/pause"' in overview
    client.post("/dashboard/queues/team%20a%2Fb/pause", {"csrf": csrf})
    odd = "SELECT paused FROM jobqd.queues WHERE name = 'team a/b'"
    assert conn.execute(odd).fetchone()[0] is True
    # Cron: listed with its next tick, and run now through the same function as jobqctl.
    _, _, page = client.get("/dashboard/cron")
    assert "nightly" in page and "03:00:00" in page
    _, headers, _ = client.post("/dashboard/cron/nightly/run", {"csrf": csrf})
    assert "enqueued as job" in client.get(headers["location"])[2]
    task = "SELECT count(*) FROM jobqd.jobs WHERE task = 'reports.nightly'"
    assert conn.execute(task).fetchone()[0] == 1
    _, headers, _ = client.post("/dashboard/cron/missing/run", {"csrf": csrf})
    assert "missing" in client.get(headers["location"])[2]


def test_overview_shows_crash_loops_and_the_hour(serve: Any, conn: psycopg.Connection):
    health = {
        "children": {
            "worker emails#0": {
                "role": "worker",
                "queue": "emails",
                "booted": False,
                "restarts": 5,
                "crash_looping": True,
                "crash_loop": "3 deaths in 60s",
                "last_exit": "exit status 1",
            }
        }
    }
    conn.execute(
        "INSERT INTO jobqd.processes (host, pid, role, metadata)"
        " VALUES ('node-7', 4242, 'http', %s)",
        (Jsonb(health),),
    )
    done = _enqueue(conn, "emails", "send")
    conn.execute(
        "UPDATE jobqd.jobs SET state = 'succeeded', attempt = 1, started_at = now(),"
        " finished_at = now() WHERE id = %s",
        (done,),
    )
    _, _, html = serve().get("/dashboard/")
    assert "Crash-looping" in html and "worker emails#0" in html and "node-7" in html
    assert "3 deaths in 60s" in html and "exit status 1" in html
    assert html.count('class="ok"') == 1  # one minute with one succeeded job
    assert "1 ok" in html

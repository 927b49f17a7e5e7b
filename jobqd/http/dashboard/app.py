"""The dashboard as one object that answers HTTP requests, whichever server carries them: the
http child (beside /metrics) or `jobqctl dashboard`.

Routes, all under /dashboard/:
  GET  /                     overview          GET  jobs, jobs/ID, processes, cron, bundles
  GET  static/NAME           the files in static/ (no sign-in needed)
  GET  login, POST login     the token form (token auth); POST logout
  POST jobs/ID/retry|cancel|delete, jobs/retry (picked ids, or all of a queue in a state),
       queues/NAME/pause|resume, cron/NAME/run
Every answer carries a strict Content-Security-Policy (scripts and styles only from static/,
nothing inline, no framing); a POST that changes something answers 303 back to the page,
whose next view shows what happened (a signed one-time cookie).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import psycopg

from jobqd.errors import DatabaseUnavailable, JobqdError, first_line
from jobqd.http.dashboard import actions, pages
from jobqd.http.dashboard.auth import SESSION_COOKIE, SESSION_SECONDS, Auth, AuthProblem, Viewer
from jobqd.http.dashboard.render import environment
from jobqd.store import browse

log = logging.getLogger("jobqd.http.dashboard")

PREFIX = "/dashboard"
MAX_FORM_BYTES = 64 * 1024
FLASH_COOKIE = "jobqd_flash"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_JOB = re.compile(r"/jobs/(\d{1,18})")
_JOB_ACTION = re.compile(r"/jobs/(\d{1,18})/(retry|cancel|delete)")
_QUEUE_ACTION = re.compile(r"/queues/([^/]{1,800})/(pause|resume)")
_CRON_ACTION = re.compile(r"/cron/([^/]{1,400})/run")


@dataclass
class Request:
    method: str
    path: str  # below PREFIX, "/" for the overview
    query: dict[str, list[str]]
    headers: Any  # email.message.Message from http.server: case-insensitive .get
    cookies: dict[str, str]
    form: dict[str, list[str]] = field(default_factory=dict)

    def arg(self, name: str) -> str | None:
        values = self.query.get(name) or [""]
        return values[0].strip() or None

    def field(self, name: str) -> str:
        return (self.form.get(name) or [""])[0].strip()


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


class BadRequest(Exception):
    """A request the dashboard cannot answer as asked; the message is shown to the viewer."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class Dashboard:
    """Pages and actions over `session()` (a context manager giving an autocommit session)."""

    def __init__(
        self,
        source: pages.Source,
        session: Callable[[], contextlib.AbstractContextManager[psycopg.Connection]],
        auth: Auth,
    ) -> None:
        self.source = source
        self.session = session
        self.auth = auth
        self.static = {
            entry.name: entry.read_bytes()
            for entry in resources.files(__package__).joinpath("static").iterdir()
            if entry.is_file()
        }
        version = hashlib.sha256(b"".join(self.static[n] for n in sorted(self.static)))
        self.env = environment(version.hexdigest()[:12])

    @staticmethod
    def handles(path: str) -> bool:
        return path == "/" or path == PREFIX or path.startswith(PREFIX + "/")

    # -- HTTP ---------------------------------------------------------------------------------

    def serve(self, handler: Any) -> None:
        """Answer the request `handler` (a BaseHTTPRequestHandler) holds, and write it back."""
        response = self.answer(handler.command, handler.path, handler.headers, handler.rfile)
        handler.send_response(response.status)
        handler.send_header("Content-Type", response.content_type)
        handler.send_header("Content-Length", str(len(response.body)))
        for name, value in (*SECURITY_HEADERS, *response.headers):
            handler.send_header(name, value)
        if handler.close_connection:
            handler.send_header("Connection", "close")
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(response.body)

    def answer(self, method: str, target: str, headers: Any, body: Any) -> Response:
        parts = urlsplit(target)
        path = parts.path
        if path in ("/", PREFIX):
            return _redirect(PREFIX + "/")
        path = path[len(PREFIX) :] or "/"
        method = "GET" if method == "HEAD" else method
        request = Request(method, path, parse_qs(parts.query), headers, _cookies(headers))
        try:
            if method == "GET" and path.startswith("/static/"):
                return self._static(path.removeprefix("/static/"))
            if path == "/login":
                return self._login(request, body)
            viewer = self.auth.viewer(headers, request.cookies)
            if method == "POST":
                self.auth.check_writable(viewer)
                request.form = _form(headers, body)
                self.auth.check_post(viewer, _flat(request.form), headers)
                return self._act(request, viewer)
            if method != "GET":
                raise BadRequest("use GET to read and POST to act", HTTPStatus.METHOD_NOT_ALLOWED)
            return self._page(request, viewer)
        except AuthProblem as exc:
            return self._refused(request, exc)
        except BadRequest as exc:
            return self._error(request, exc.status, str(exc))
        except (DatabaseUnavailable, psycopg.OperationalError) as exc:
            log.warning("dashboard %s %s: database unreachable: %s", method, path, first_line(exc))
            return self._error(request, HTTPStatus.SERVICE_UNAVAILABLE, _database_problem(exc))
        except psycopg.Error as exc:
            log.warning("dashboard %s %s failed: %s", method, path, _primary(exc))
            return self._error(
                request, HTTPStatus.INTERNAL_SERVER_ERROR, f"the database refused: {_primary(exc)}"
            )
        except Exception:
            log.exception("dashboard %s %s failed", method, path)
            message = "the dashboard failed on this request; its log says why"
            return Response(HTTPStatus.INTERNAL_SERVER_ERROR, message.encode(), "text/plain")

    # -- pages --------------------------------------------------------------------------------

    def _page(self, request: Request, viewer: Viewer) -> Response:
        path = request.path
        with self.session() as conn:
            if path == "/":
                data = pages.overview(conn, self.source)
                return self._render(request, viewer, "overview.html", data)
            if path == "/jobs":
                filters, before = _filters(request)
                data = pages.jobs(conn, self.source, filters, before)
                next_before = data["page"].next_before
                data["next_url"] = _list_url(filters, next_before) if next_before else None
                data["newest_url"] = _list_url(filters, None) if before else None
                data["bulk_all"] = (
                    filters.queue is not None
                    and filters.state in ("dead", "cancelled")
                    and not (filters.task or filters.text or filters.bundle)
                )
                return self._render(request, viewer, "jobs.html", data)
            if match := _JOB.fullmatch(path):
                data = pages.job(conn, self.source, int(match.group(1)))
                if data is None:
                    raise BadRequest(
                        f"no job {match.group(1)}: it may have been pruned", HTTPStatus.NOT_FOUND
                    )
                return self._render(request, viewer, "job.html", data)
            if path == "/processes":
                return self._render(
                    request, viewer, "processes.html", pages.processes(conn, self.source)
                )
            if path == "/cron":
                return self._render(request, viewer, "cron.html", pages.cron(conn, self.source))
            if path == "/bundles":
                unfinished = request.arg("unfinished") == "1"
                data = pages.bundle_list(conn, self.source, unfinished)
                return self._render(request, viewer, "bundles.html", data)
        raise BadRequest(f"no such page: {PREFIX}{path}", HTTPStatus.NOT_FOUND)

    def _render(
        self,
        request: Request,
        viewer: Viewer,
        template: str,
        data: dict[str, Any],
        status: int = HTTPStatus.OK,
    ) -> Response:
        flash, headers = self._take_flash(request)
        context = {
            **data,
            "prefix": PREFIX,
            "path": request.path,
            "here": PREFIX + request.path + _query_string(request.query),
            "viewer": viewer,
            "auth": self.auth.mode,
            "writable": viewer.writable,
            "csrf": self.auth.csrf_token(viewer) if viewer.writable else "",
            "flash": flash,
        }
        html = self.env.get_template(template).render(context)
        return Response(status, html.encode(), headers=headers)

    def _static(self, name: str) -> Response:
        suffix = "." + name.rpartition(".")[2]
        if not _STATIC_NAME.fullmatch(name) or name not in self.static:
            raise BadRequest(f"no static file {name!r}", HTTPStatus.NOT_FOUND)
        headers = [("Cache-Control", "public, max-age=86400")]
        content_type = STATIC_TYPES.get(suffix, "application/octet-stream")
        return Response(HTTPStatus.OK, self.static[name], content_type, headers)

    # -- sign-in ------------------------------------------------------------------------------

    def _login(self, request: Request, body: Any) -> Response:
        if self.auth.mode != "token":
            raise BadRequest("this dashboard signs in by its own means, not a form", 404)
        if request.method == "GET":
            data = {"failed": False, "query_next": _local(request.arg("next"))}
            return self._render(request, Viewer("", "", False), "login.html", data)
        form = _flat(_form(request.headers, body))
        if self.auth.missing:
            raise AuthProblem(503, f"dashboard disabled: set {self.auth.missing} for this process")
        if not self.auth.token_matches(form.get("token", "")):
            log.warning("dashboard: a sign-in with a wrong token")
            data = {"failed": True, "query_next": _local(form.get("next"))}
            return self._render(request, Viewer("", "", False), "login.html", data, 401)
        cookie = _cookie(SESSION_COOKIE, self.auth.new_session(), SESSION_SECONDS)
        return _redirect(_local(form.get("next")), [("Set-Cookie", cookie)])

    def _refused(self, request: Request, exc: AuthProblem) -> Response:
        if exc.status == 401 and self.auth.mode == "token" and request.method == "GET":
            return _redirect(PREFIX + "/login?" + urlencode({"next": PREFIX + request.path}))
        response = self._error(request, exc.status, str(exc))
        if exc.challenge:
            response.headers.append(("WWW-Authenticate", 'Basic realm="jobqd", charset="UTF-8"'))
        return response

    def _error(self, request: Request, status: int, message: str) -> Response:
        viewer = Viewer("", "", False)
        return self._render(request, viewer, "error.html", {"message": message}, status)

    # -- actions ------------------------------------------------------------------------------

    def _act(self, request: Request, viewer: Viewer) -> Response:
        path, by, schema = request.path, viewer.name, self.source.schema
        back = _local(request.field("next"))
        if path == "/logout":
            return _redirect(PREFIX + "/", [("Set-Cookie", _cookie(SESSION_COOKIE, "", 0))])
        try:
            with self.session() as conn:
                if match := _JOB_ACTION.fullmatch(path):
                    job_id, verb = int(match.group(1)), match.group(2)
                    notice = actions.job_action(conn, schema, verb, job_id, by)
                    if verb == "delete" and notice.ok:
                        back = PREFIX + "/jobs"
                elif path == "/jobs/retry":
                    notice = self._bulk_retry(conn, request, by)
                elif match := _QUEUE_ACTION.fullmatch(path):
                    queue, verb = unquote(match.group(1)), match.group(2)
                    if verb == "pause":
                        duration = request.field("duration") or None
                        notice = actions.pause(conn, schema, queue, duration, by)
                    else:
                        notice = actions.resume(conn, schema, queue, by)
                elif match := _CRON_ACTION.fullmatch(path):
                    name = unquote(match.group(1))
                    notice = actions.run_cron(conn, self.source.settings, name, by)
                else:
                    raise BadRequest(f"no such action: {PREFIX}{path}", HTTPStatus.NOT_FOUND)
        except (ValueError, JobqdError) as exc:
            notice = actions.Notice(first_line(exc), ok=False)
        return _redirect(back, [("Set-Cookie", self._flash_cookie(notice))])

    def _bulk_retry(self, conn: psycopg.Connection, request: Request, by: str) -> actions.Notice:
        if request.field("all") == "1":
            queue, state = request.field("queue"), request.field("state")
            if not queue or not state:
                raise BadRequest("retrying all needs a queue and a state")
            return actions.retry_all(conn, self.source.schema, queue, state, by)
        try:
            ids = [int(value) for value in request.form.get("id", [])]
        except ValueError:
            raise BadRequest("job ids are numbers") from None
        return actions.retry_ids(conn, self.source.schema, ids, by)

    # -- the one-time notice ------------------------------------------------------------------

    def _flash_cookie(self, notice: actions.Notice) -> str:
        text = ("ok:" if notice.ok else "no:") + notice.text
        encoded = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
        return _cookie(FLASH_COOKIE, f"{encoded}.{self.auth.sign('flash', encoded)}", 60)

    def _take_flash(self, request: Request) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
        value = request.cookies.get(FLASH_COOKIE)
        if not value:
            return None, []
        clear = [("Set-Cookie", _cookie(FLASH_COOKIE, "", 0))]
        encoded, _, signature = value.partition(".")
        if not hmac.compare_digest(signature, self.auth.sign("flash", encoded)):
            return None, clear
        try:
            text = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None, clear
        return {"ok": text.startswith("ok:"), "text": text[3:]}, clear


# -- helpers ----------------------------------------------------------------------------------


def _filters(request: Request) -> tuple[browse.Filters, int | None]:
    state = request.arg("state")
    if state is not None and state not in pages.STATES:
        raise BadRequest(f"unknown state {state!r}: one of {', '.join(pages.STATES)}")
    bundle = _whole(request.arg("bundle"), "bundle")
    before = _whole(request.arg("before"), "before")
    text = request.arg("q")
    if text is not None and len(text) > 200:
        raise BadRequest("the search text is over 200 characters")
    filters = browse.Filters(
        queue=request.arg("queue"),
        state=state,
        task=request.arg("task"),
        text=text,
        bundle=bundle,
    )
    return filters, before


def _whole(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(f"{name} must be a whole number, got {text[:40]!r}")
    return int(text)


def _list_url(filters: browse.Filters, before: int | None) -> str:
    params = {
        "queue": filters.queue,
        "state": filters.state,
        "task": filters.task,
        "q": filters.text,
        "bundle": filters.bundle,
        "before": before,
    }
    return PREFIX + "/jobs?" + urlencode({k: v for k, v in params.items() if v is not None})


def _query_string(query: dict[str, list[str]]) -> str:
    return ("?" + urlencode(query, doseq=True)) if query else ""


def _cookies(headers: Any) -> dict[str, str]:
    jar = SimpleCookie()
    with contextlib.suppress(CookieError):
        jar.load(headers.get("Cookie") or "")
    return {name: morsel.value for name, morsel in jar.items()}


def _cookie(name: str, value: str, max_age: int) -> str:
    return f"{name}={value}; Path={PREFIX}/; Max-Age={max_age}; HttpOnly; SameSite=Strict"


def _form(headers: Any, body: Any) -> dict[str, list[str]]:
    kind = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise BadRequest("send the form as application/x-www-form-urlencoded")
    try:
        size = int(headers.get("Content-Length") or "")
    except ValueError:
        raise BadRequest("send a Content-Length header", HTTPStatus.LENGTH_REQUIRED) from None
    if not 0 <= size <= MAX_FORM_BYTES:
        raise BadRequest(f"a form is at most {MAX_FORM_BYTES} bytes", 413)
    try:
        return parse_qs(body.read(size).decode(), max_num_fields=MAX_FORM_BYTES // 8)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the form is not valid UTF-8 form data") from None


def _flat(form: dict[str, list[str]]) -> dict[str, str]:
    return {name: values[0] for name, values in form.items() if values}


def _local(target: str | None) -> str:
    """A redirect target within the dashboard, never another site."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//"):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and "\\" not in target:
            return target
    return PREFIX + "/"


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    safe = quote(location, safe="/?&=%:+,.-_~")
    return Response(HTTPStatus.SEE_OTHER, b"", headers=[("Location", safe), *(headers or [])])


def _primary(exc: psycopg.Error) -> str:
    """The server's primary message only: DETAIL and CONTEXT can quote rows and SQL."""
    return exc.diag.message_primary or type(exc).__name__


def _database_problem(exc: BaseException) -> str:
    if isinstance(exc, DatabaseUnavailable):
        return f"database unreachable: {first_line(exc)}"
    return "database unreachable: the session failed; this page retries on the next refresh"

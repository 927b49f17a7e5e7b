"""The web dashboard: see and steer the queues in a browser.

Served by the http child when `http.dashboard: true`, beside /metrics, and by `jobqctl
dashboard` against any database. Pages read through jobqd.store (as jobqctl does), actions
call the functions jobqctl calls, templates and static files ship in the wheel. Safety rules
(read-only without `http.dashboard_auth`, CSRF, CSP) are in auth.py and app.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import psycopg

from jobqd.config.settings import DashboardAuthSettings, Settings
from jobqd.http.dashboard.app import Dashboard
from jobqd.http.dashboard.auth import Auth, from_environment
from jobqd.http.dashboard.pages import Source

__all__ = ["Auth", "Dashboard", "Source", "Unavailable", "build"]


def build(
    schema: str,
    settings: Settings | None,
    session: Callable[[], contextlib.AbstractContextManager[psycopg.Connection]],
    auth: DashboardAuthSettings | None,
) -> Dashboard:
    """The dashboard over `session`, signing in as `auth` says (secrets from the
    environment); `settings`, when given, adds cron entries and per-node limits.
    JobqdError when the `dashboard` extra is not installed."""
    return Dashboard(Source(schema, settings), session, from_environment(auth))


class Unavailable:
    """What /dashboard/ answers when the dashboard cannot be built (its extra is not
    installed): 503 and why, while /metrics and the health checks go on being served."""

    handles = staticmethod(Dashboard.handles)

    def __init__(self, reason: str) -> None:
        self.body = f"dashboard unavailable: {reason}\n".encode()

    def serve(self, handler: Any) -> None:
        handler.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
        handler.send_header("Content-Type", "text/plain; charset=utf-8")
        handler.send_header("Content-Length", str(len(self.body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(self.body)

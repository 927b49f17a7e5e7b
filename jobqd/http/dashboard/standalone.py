"""`jobqctl dashboard`: the dashboard on a small server of its own, in the jobqctl process,
against any database, with no daemon running."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jobqd.http.dashboard.app import Dashboard

log = logging.getLogger("jobqd.http.dashboard")

REQUEST_TIMEOUT = 10.0
"""Seconds a client may take to send its request (slow clients hold a thread)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def make_server(dashboard: Dashboard, host: str, port: int) -> ThreadingHTTPServer:
    """A server for `dashboard` bound to host:port (IPv6 when the host has a colon);
    OSError when the address cannot be bound."""

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT
        server_version = "jobqd"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard %s " + format, self.client_address[0], *args)

        def _answer(self) -> None:
            if dashboard.handles(self.path.split("?", 1)[0]):
                dashboard.serve(self)
                return
            body = b"not found: the dashboard is at /dashboard/\n"
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _answer

    server_class: type[_Server] = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    return server_class((host, port), Handler)


def serve(server: ThreadingHTTPServer, on_ready: Callable[[str], None]) -> None:
    """Serve until interrupted; `on_ready` gets the dashboard's URL once it listens."""
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    on_ready(f"http://{shown}:{port}/dashboard/")
    try:
        server.serve_forever()
    finally:
        server.server_close()

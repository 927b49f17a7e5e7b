"""The one error type the http child's endpoints raise: a status and a message for the client."""

from __future__ import annotations

from http import HTTPStatus


class ApiError(Exception):
    """An answer other than success: status code and a message for the `error` field.
    `headers` are sent along (Retry-After on a 503, WWW-Authenticate on a 401)."""

    def __init__(
        self, status: HTTPStatus, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}

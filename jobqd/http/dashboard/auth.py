"""Who is looking at the dashboard, and whether a POST may change anything.

Without `http.dashboard_auth` the dashboard is read-only for whoever reaches the listener, and
every POST is refused. With it, every page needs a signed-in viewer: a token (the login form
sets a session cookie; scripts may send `Authorization: Bearer`) or basic-auth credentials, the
secrets read from environment variables. A state change then also needs the CSRF token of the
viewer's session in the form, and a browser's Origin, when sent, must be this host.

Sessions and CSRF tokens are HMACs under a key drawn when the process starts, so nothing is
stored and a restart signs everyone out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from jobqd.config.settings import DashboardAuthSettings

SESSION_COOKIE = "jobqd_session"
SESSION_SECONDS = 12 * 3600
"""How long a sign-in with the token lasts."""


class AuthProblem(Exception):
    """The request may not go on; `status` and the message say why (never a secret)."""

    def __init__(self, status: int, message: str, challenge: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.challenge = challenge


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who made a request: `name` for logs and `pause ... by`; `subject` keys the CSRF token;
    `writable` when auth is configured and this viewer signed in."""

    name: str
    subject: str
    writable: bool


ANONYMOUS = Viewer("anonymous", "anonymous", writable=False)


class Auth:
    """The dashboard's sign-in rules, from the settings and the environment."""

    def __init__(self, settings: DashboardAuthSettings | None, env: Mapping[str, str]) -> None:
        self.settings = settings
        self.mode = "none"
        self.token: str | None = None
        self.user: str | None = None
        self.password: str | None = None
        self.missing: str | None = None
        if settings is not None and settings.token_env is not None:
            self.mode = "token"
            self.token = env.get(settings.token_env) or None
            if self.token is None:
                self.missing = settings.token_env
        elif settings is not None:
            self.mode = "basic"
            self.user = env.get(settings.user_env or "") or None
            self.password = env.get(settings.password_env or "") or None
            if self.user is None or self.password is None:
                self.missing = settings.user_env if self.user is None else settings.password_env
        self._key = secrets.token_bytes(32)

    @property
    def required(self) -> bool:
        return self.mode != "none"

    def describe(self) -> str:
        """One line for the log at start."""
        if self.mode == "none":
            return "read-only: no http.dashboard_auth"
        if self.missing:
            return f"disabled: {self.missing} is not set in the environment"
        return f"sign-in by {self.mode}"

    # -- identifying the viewer -------------------------------------------------------------

    def viewer(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> Viewer:
        """Who sent this request; AuthProblem when auth is required and they did not sign in."""
        if self.mode == "none":
            return ANONYMOUS
        if self.missing:
            raise AuthProblem(
                503, f"dashboard disabled: set {self.missing} in the environment of this process"
            )
        scheme, _, given = (headers.get("Authorization") or "").partition(" ")
        if self.mode == "basic":
            user = self._basic_user(scheme, given.strip())
            if user is None:
                raise AuthProblem(401, "sign in with the dashboard's user and password", True)
            return Viewer(user, "basic:" + user, writable=True)
        if scheme.lower() == "bearer" and self.token_matches(given.strip()):
            return Viewer("token", "bearer", writable=True)
        nonce = self._session_nonce(cookies.get(SESSION_COOKIE, ""))
        if nonce is None:
            raise AuthProblem(401, "sign in with the dashboard token")
        return Viewer("token", "session:" + nonce, writable=True)

    def token_matches(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def _basic_user(self, scheme: str, given: str) -> str | None:
        if scheme.lower() != "basic" or self.user is None or self.password is None:
            return None
        try:
            user, _, password = base64.b64decode(given, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        same_user = hmac.compare_digest(user.encode(), self.user.encode())
        same_password = hmac.compare_digest(password.encode(), self.password.encode())
        return user if same_user and same_password else None

    # -- sessions ---------------------------------------------------------------------------

    def new_session(self) -> str:
        """A cookie value for a viewer who just gave the right token."""
        expires = int(time.time()) + SESSION_SECONDS
        body = f"{expires}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._sign('session', body)}"

    def _session_nonce(self, value: str) -> str | None:
        body, _, signature = value.rpartition(".")
        expires, _, nonce = body.partition(".")
        if not (body and nonce and expires.isdigit()):
            return None
        if not hmac.compare_digest(signature, self._sign("session", body)):
            return None
        return nonce if int(expires) > time.time() else None

    # -- CSRF -------------------------------------------------------------------------------

    def csrf_token(self, viewer: Viewer) -> str:
        return self._sign("csrf", viewer.subject)

    def check_writable(self, viewer: Viewer) -> None:
        """Refuse any state change in a read-only dashboard or from a viewer not signed in."""
        if not self.required:
            raise AuthProblem(
                403, "the dashboard is read-only: configure http.dashboard_auth to act from it"
            )
        if not viewer.writable:
            raise AuthProblem(401, "sign in to act from the dashboard")

    def check_post(
        self, viewer: Viewer, form: Mapping[str, str], headers: Mapping[str, str]
    ) -> None:
        """Refuse a state change that another site may have sent (after check_writable)."""
        self.check_writable(viewer)
        origin = headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != headers.get("Host", ""):
            raise AuthProblem(403, "refused: the request came from another site")
        given = form.get("csrf", "")
        if not given or not hmac.compare_digest(given, self.csrf_token(viewer)):
            raise AuthProblem(403, "refused: missing or stale form token; reload the page, retry")

    def sign(self, purpose: str, text: str) -> str:
        """A signature other parts use for values they round-trip through the browser."""
        return self._sign(purpose, text)

    def _sign(self, purpose: str, text: str) -> str:
        digest = hmac.new(self._key, f"{purpose}\n{text}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


def from_environment(settings: DashboardAuthSettings | None) -> Auth:
    return Auth(settings, os.environ)

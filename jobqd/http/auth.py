"""Bearer tokens and their scopes: who may call which endpoint of the http child.

Tokens live in the daemon's environment, never in the YAML: `http.tokens` maps a scope to the
names of the variables holding its tokens, and `http.token_env` names the admin token (what
the single token of old could do). A token found under several scopes has all of them, and
`admin` implies every scope. Every check hashes the presented token and compares it with every
configured token in constant time, so neither a token's length nor which one matched shows in
the answer's timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus

from jobqd.config.settings import TOKEN_SCOPES, HttpSettings
from jobqd.http.errors import ApiError

ADMIN = "admin"
WORKER = "worker"
ENQUEUE = "enqueue"
assert set(TOKEN_SCOPES) == {ADMIN, WORKER, ENQUEUE}


@dataclass(frozen=True, slots=True)
class _Granted:
    digest: bytes
    scopes: frozenset[str]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The configured tokens with their scopes; `require` guards an endpoint."""

    def __init__(self, granted: Mapping[str, frozenset[str]], unset: tuple[str, ...] = ()) -> None:
        self._granted = tuple(_Granted(_digest(t), s) for t, s in granted.items())
        self.scopes = frozenset().union(*(g.scopes for g in self._granted))
        self.unset = unset
        """Environment variables the settings name that are not set (logged at start)."""

    @classmethod
    def from_settings(cls, http: HttpSettings, env: Mapping[str, str] = os.environ) -> Tokens:
        sources: dict[str, set[str]] = {http.token_env: {ADMIN}}
        for scope, names in http.tokens.items():
            for name in names:
                sources.setdefault(name, set()).add(scope)
        granted: dict[str, set[str]] = {}
        unset = []
        for name, scopes in sources.items():
            token = env.get(name) or ""
            if token.strip():
                granted.setdefault(token.strip(), set()).update(scopes)
            else:
                unset.append(name)
        frozen = {token: frozenset(scopes) for token, scopes in granted.items()}
        return cls(frozen, tuple(unset))

    def scopes_of(self, header: str | None) -> frozenset[str]:
        """The scopes of the token in an Authorization header; empty when it matches none."""
        scheme, _, given = (header or "").partition(" ")
        digest = _digest(given.strip())
        found: frozenset[str] = frozenset()
        for granted in self._granted:  # no early exit: every comparison is made
            if hmac.compare_digest(digest, granted.digest):
                found = found | granted.scopes
        return found if scheme.lower() == "bearer" else frozenset()

    def require(self, header: str | None, scope: str, what: str) -> frozenset[str]:
        """The caller's scopes, when they include `scope` (or admin); else 503 when no token
        is configured at all, 401 for a missing or unknown token, 403 for a token without
        the scope. `what` names the endpoint in the 403's message."""
        if not self._granted:
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"API disabled: set {' or '.join(self.unset)} in the daemon's environment "
                "(http.token_env, http.tokens)",
            )
        scopes = self.scopes_of(header)
        if not scopes:
            raise ApiError(
                HTTPStatus.UNAUTHORIZED,
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="jobqd"'},
            )
        if scope not in scopes and ADMIN not in scopes:
            have = ", ".join(sorted(scopes))
            raise ApiError(
                HTTPStatus.FORBIDDEN,
                f"{what} needs a token with the {scope!r} scope; this token has: {have}",
            )
        return scopes

    def describe(self) -> str:
        """`worker, admin` and the unset variables, for the start log line."""
        text = ", ".join(s for s in TOKEN_SCOPES if s in self.scopes) or "none"
        if self.unset:
            text += f" (not set: {', '.join(self.unset)})"
        return text

"""Bearer tokens and scopes (jobqd.http.auth), from the settings as the daemon reads them."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from jobqd.config.settings import ConfigError, parse
from jobqd.http.auth import Tokens
from jobqd.http.errors import ApiError

CONFIG = """
http:
  listen: 127.0.0.1:9187
  token_env: OLD_TOKEN
  tokens:
    worker: [W1, W2]
    enqueue: E
    admin: A
"""


def tokens(env: dict[str, str], text: str = CONFIG) -> Tokens:
    return Tokens.from_settings(parse(text, "jobqd.yaml", {}).http, env)


def refused(tokens: Tokens, header: str | None, scope: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        tokens.require(header, scope, "POST /x")
    return caught.value


def test_scopes_come_from_the_environment():
    found = tokens({"W1": "one", "W2": "two", "E": "one", "A": "adm", "OLD_TOKEN": "old"})
    assert found.scopes_of("Bearer one") == {"worker", "enqueue"}  # the same token twice
    assert found.scopes_of("Bearer two") == {"worker"}
    assert found.scopes_of("bearer  old ") == {"admin"}
    assert found.scopes_of("Basic one") == frozenset()
    assert found.require("Bearer adm", "worker", "POST /x") == {"admin"}  # admin: every scope
    error = refused(found, "Bearer two", "enqueue")
    assert error.status == HTTPStatus.FORBIDDEN
    assert str(error) == "POST /x needs a token with the 'enqueue' scope; this token has: worker"
    for header in (None, "", "Bearer", "Bearer nope", "Bearer onex"):
        error = refused(found, header, "worker")
        assert (error.status, str(error)) == (
            HTTPStatus.UNAUTHORIZED,
            "missing or wrong bearer token",
        )
        assert error.headers == {"WWW-Authenticate": 'Bearer realm="jobqd"'}
    assert found.describe() == "worker, enqueue, admin"


def test_unset_variables_are_named():
    found = tokens({"W1": "one", "E": "  "})
    assert found.describe() == "worker (not set: OLD_TOKEN, W2, E, A)"
    error = refused(tokens({}), "Bearer x", "worker")
    assert error.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert str(error).startswith("API disabled: set OLD_TOKEN or W1 or W2 or E or A in")
    assert tokens({"JOBQD_HTTP_TOKEN": "t"}, "").scopes_of("Bearer t") == {"admin"}


@pytest.mark.parametrize(
    ("tokens_yaml", "message"),
    [
        ("{workers: W}", 'unknown scope "workers" (did you mean "worker"?)'),
        ("{worker: []}", "worker: expected at least one environment variable name"),
        ("{worker: s3cr3t-value}", "never the token itself"),
        ("[W]", "expected a mapping of scopes (worker, enqueue, admin)"),
    ],
)
def test_config_errors(tokens_yaml: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse(f"http:\n  tokens: {tokens_yaml}\n", "jobqd.yaml", {})
    assert len(caught.value.errors) == 1
    assert "jobqd.yaml:2: http.tokens:" in caught.value.errors[0]
    assert message in caught.value.errors[0]

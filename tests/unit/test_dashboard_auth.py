"""The dashboard's settings and sign-in rules, without a server: sessions, CSRF tokens,
basic credentials, Origin, and what a read-only dashboard refuses."""

from __future__ import annotations

import base64

import pytest

from jobqd.config.settings import ConfigError, DashboardAuthSettings, parse
from jobqd.http.dashboard.auth import SESSION_COOKIE, Auth, AuthProblem


def test_settings_for_the_dashboard():
    with pytest.raises(ConfigError, match=r"http\.dashboard: the dashboard is served on"):
        parse("http:\n  dashboard: true\n")
    with pytest.raises(ConfigError, match="password_env: give token_env, or both"):
        parse("http:\n  listen: 127.0.0.1:9\n  dashboard_auth:\n    user_env: U\n")
    with pytest.raises(ConfigError, match="not both"):
        parse("http:\n  listen: 127.0.0.1:9\n  dashboard_auth: {token_env: T, user_env: U}\n")
    with pytest.raises(ConfigError, match="expected an environment variable"):
        parse("http:\n  listen: 127.0.0.1:9\n  dashboard_auth: {token_env: 'not a name'}\n")
    settings = parse("http:\n  listen: 127.0.0.1:9\n  dashboard: true\n")
    assert settings.http.dashboard and settings.http.dashboard_auth is None
    assert parse("").http.dashboard is False


def test_read_only_refuses_every_change():
    auth = Auth(None, {})
    viewer = auth.viewer({}, {})
    assert not viewer.writable and auth.describe().startswith("read-only")
    with pytest.raises(AuthProblem, match="read-only") as refused:
        auth.check_post(viewer, {"csrf": auth.csrf_token(viewer)}, {})
    assert refused.value.status == 403


def test_token_sessions_and_csrf():
    auth = Auth(DashboardAuthSettings(token_env="T"), {"T": "tok"})
    with pytest.raises(AuthProblem) as missing:
        auth.viewer({}, {})
    assert missing.value.status == 401
    viewer = auth.viewer({}, {SESSION_COOKIE: auth.new_session()})
    assert viewer.writable
    token = auth.csrf_token(viewer)
    host = {"Host": "127.0.0.1:9"}
    auth.check_post(viewer, {"csrf": token}, host)
    auth.check_post(viewer, {"csrf": token}, {**host, "Origin": "http://127.0.0.1:9"})
    for form, headers in (
        ({}, host),
        ({"csrf": token + "x"}, host),
        ({"csrf": token}, {**host, "Origin": "https://evil.example"}),
    ):
        with pytest.raises(AuthProblem) as refused:
            auth.check_post(viewer, form, headers)
        assert refused.value.status == 403
    # Another session has another CSRF token; another process's key signs nothing here.
    other = auth.viewer({}, {SESSION_COOKIE: auth.new_session()})
    assert auth.csrf_token(other) != token
    stranger = Auth(DashboardAuthSettings(token_env="T"), {"T": "tok"})
    with pytest.raises(AuthProblem):
        stranger.viewer({}, {SESSION_COOKIE: auth.new_session()})
    expired = "1000." + "nonce"
    with pytest.raises(AuthProblem):
        auth.viewer({}, {SESSION_COOKIE: f"{expired}.{auth.sign('session', expired)}"})
    assert auth.viewer({"Authorization": "Bearer tok"}, {}).writable
    with pytest.raises(AuthProblem):
        auth.viewer({"Authorization": "Bearer nope"}, {})


def test_basic_credentials_and_a_missing_secret():
    auth = Auth(DashboardAuthSettings(user_env="U", password_env="P"), {"U": "ops", "P": "p:w"})

    def basic(text: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}

    assert auth.viewer(basic("ops:p:w"), {}).name == "ops"
    for wrong in ({}, basic("ops:p"), basic("root:p:w"), {"Authorization": "Basic !!!"}):
        with pytest.raises(AuthProblem) as refused:
            auth.viewer(wrong, {})
        assert refused.value.status == 401 and refused.value.challenge
    unset = Auth(DashboardAuthSettings(user_env="U", password_env="P"), {"U": "ops"})
    with pytest.raises(AuthProblem, match="set P") as closed:
        unset.viewer(basic("ops:"), {})
    assert closed.value.status == 503

"""The dashboard as an operator uses it: the daemon (a subprocess) serves it beside /metrics,
Debian's headless Chromium drives it through selenium, and the database shows what changed.

Screenshots of every page go to the test's tmp_path (and, when JOBQD_TEST_SCREENSHOTS names
a directory, there too: that is how docs/dashboard/ is made). Needs /usr/bin/chromium and
/usr/bin/chromedriver (Debian packages chromium and chromium-driver) and selenium."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from e2e_daemon import base_config, enqueue, ledger_count
from faults import free_port
from helpers import wait_for

from jobqd.store import bundles

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "e2e-dashboard-token"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytest.importorskip("jinja2", reason="the dashboard extra (jinja2) is not installed")
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)

from selenium.common.exceptions import NoSuchElementException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1440,1000")
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The system chromedriver, so Selenium Manager never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


class Shots:
    """Screenshots into the test's directory (and JOBQD_TEST_SCREENSHOTS, if set)."""

    def __init__(self, driver: Any, directory: Path) -> None:
        self.driver = driver
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        extra = os.environ.get("JOBQD_TEST_SCREENSHOTS")
        self.extra = Path(extra) if extra else None
        self.taken: list[Path] = []

    def take(self, name: str) -> None:
        path = self.directory / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot {path}"
        self.taken.append(path)
        if self.extra is not None:
            self.extra.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.extra / path.name)


def _wait_text(driver: Any, text: str, timeout: float = 20) -> None:
    wait_for(lambda: text in driver.page_source, timeout=timeout, what=f"{text!r} on the page")


def _post(port: int, path: str, form: dict[str, str], cookie: str | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie:
        headers["Cookie"] = cookie
    connection.request("POST", path, body=urlencode(form), headers=headers)
    status = connection.getresponse().status
    connection.close()
    return status


def _state(dsn: str, job_id: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT state FROM jobqd.jobs WHERE id = %s", (job_id,)).fetchone()[0]


def test_an_operator_finds_a_dead_job_and_retries_it(jobqd, ledger, browser, tmp_path):
    port = free_port()
    config = base_config(ledger)
    config["queues"] = {
        "default": {"processes": 1, "concurrency": 4},
        "emails": {"processes": 1, "concurrency": 2},
    }
    config["http"] = {
        "listen": f"127.0.0.1:{port}",
        "dashboard": True,
        "dashboard_auth": {"token_env": "JOBQD_DASHBOARD_TOKEN"},
    }
    config["cron"] = {"nightly-report": {"schedule": "0 3 * * *", "task": "test.noop"}}
    daemon = jobqd(config, env={"JOBQD_DASHBOARD_TOKEN": TOKEN})
    daemon.booted("worker default#0")
    done = enqueue(ledger, "test.noop", count=40) + enqueue(ledger, "test.result", {"n": 2})
    failing = enqueue(ledger, "test.fail", {"order": "<b>A-17</b>"}, count=3)
    enqueue(ledger, "test.noop", queue="emails", count=5)
    with psycopg.connect(ledger, autocommit=True) as conn:
        bundles.enqueue(conn, "jobqd", [("test.noop", {"row": n}) for n in range(6)], name="import")
    wait_for(
        lambda: all(_state(ledger, i) == "dead" for i in failing),
        timeout=60,
        what="the failing jobs dead",
    )
    wait_for(lambda: all(_state(ledger, i) == "succeeded" for i in done), timeout=60, what="done")
    assert ledger_count(ledger, "job_id = %s", (failing[0],)) == 3

    base = f"http://127.0.0.1:{port}/dashboard"
    shots = Shots(browser, tmp_path / "screenshots")
    browser.get(base + "/")
    assert "/dashboard/login" in browser.current_url  # signing in is required
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    _wait_text(browser, "Queues")
    assert browser.current_url == base + "/"

    # Overview: per queue depth, with the dead jobs counted and linked.
    dead_link = browser.find_element(
        By.CSS_SELECTOR, 'a[href="/dashboard/jobs?queue=default&state=dead"]'
    )
    assert dead_link.text == "3"
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.ok"), "the hour chart is empty"
    # Live refresh: a job enqueued now shows up without the page being loaded again.
    browser.execute_script("window.jobqdMarker = 'same page';")
    enqueue(ledger, "test.noop", queue="reports")  # a queue no worker serves: it waits
    wait_for(
        lambda: browser.find_elements(
            By.CSS_SELECTOR, 'a[href="/dashboard/jobs?queue=reports&state=queued"]'
        ),
        timeout=30,
        what="the overview to refresh by itself",
    )
    assert browser.execute_script("return window.jobqdMarker;") == "same page"
    shots.take("overview")

    # The jobs list, filtered with its form.
    browser.get(base + "/jobs")
    browser.find_element(By.NAME, "queue").send_keys("default")
    Select(browser.find_element(By.NAME, "state")).select_by_visible_text("dead")
    browser.find_element(By.CSS_SELECTOR, ".filters button[type=submit]").click()
    _wait_text(browser, "Retry all dead jobs of default")
    assert "state=dead" in browser.current_url
    rows = browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")
    assert sorted(int(r.find_element(By.CSS_SELECTOR, "td.num a").text) for r in rows) == failing
    assert "&lt;b&gt;A-17&lt;/b&gt;" in browser.page_source  # args escaped, not markup
    shots.take("jobs")

    # A job's detail: args, attempts and the error history with tracebacks.
    target = failing[0]
    browser.find_element(By.LINK_TEXT, str(target)).click()
    _wait_text(browser, f"Job {target}")
    assert "boom on attempt 3" in browser.page_source
    assert "Traceback (most recent call last)" in browser.page_source
    assert len(browser.find_elements(By.CSS_SELECTOR, "details.error")) == 3
    shots.take("job")

    # Retry: the worker runs the job again, so three more attempts reach the ledger.
    browser.find_element(By.XPATH, "//button[text()='Retry']").click()
    _wait_text(browser, f"job {target} put back in line")
    wait_for(
        lambda: ledger_count(ledger, "job_id = %s", (target,)) == 6,
        timeout=60,
        what="the retried job to run again",
    )
    wait_for(lambda: _state(ledger, target) == "dead", timeout=30, what="the retry to end")
    shots.take("job-retried")

    for page, text in (("processes", "Leader:"), ("cron", "nightly-report"), ("bundles", "import")):
        browser.get(f"{base}/{page}")
        _wait_text(browser, text)
        shots.take(page)
    browser.get(base + "/processes")
    assert browser.find_elements(By.CSS_SELECTOR, ".state.leader"), "no leader shown"

    # The strict CSP holds htmx and the pages: the browser reported no violation.
    problems = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]
    ]
    assert problems == []

    # Plain HTTP: a POST without sign-in, and one signed in but without the CSRF token, are
    # refused, and the job stays as it is.
    session = browser.get_cookie("jobqd_session")["value"]
    path = f"/dashboard/jobs/{target}/retry"
    assert _post(port, path, {}) == 401
    assert _post(port, path, {}, cookie=f"jobqd_session={session}") == 403
    assert _post(port, path, {"csrf": "forged"}, cookie=f"jobqd_session={session}") == 403
    assert _state(ledger, target) == "dead"
    assert ledger_count(ledger, "job_id = %s", (target,)) == 6
    assert len(shots.taken) == 7
    with pytest.raises(NoSuchElementException):
        browser.find_element(By.CSS_SELECTOR, "[style]")  # nothing the CSP would block


def test_jobqctl_dashboard_serves_any_database_read_only(ledger):
    enqueue(ledger, "test.noop", queue="reports", count=2)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobqd.cli.ctl",
            "--dsn",
            ledger,
            "dashboard",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        assert f"dashboard on http://127.0.0.1:{port}/dashboard/ (read-only" in line, line
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/dashboard/")
        response = connection.getresponse()
        page = response.read().decode()
        assert response.status == 200 and ">reports</a>" in page
        assert _post(port, "/dashboard/queues/reports/pause", {"csrf": "x"}) == 403
    finally:
        proc.terminate()
        proc.wait(10)
    taken = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobqd.cli.ctl",
            "--dsn",
            ledger,
            "dashboard",
            "--listen",
            f"127.0.0.1:{port}x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert taken.returncode == 2 and "--listen takes HOST:PORT" in taken.stderr

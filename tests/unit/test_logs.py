import io
import json
import logging
import os
import re
import socket

import pytest

from jobqd.observe import logs


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    level = root.level
    yield
    if logs._handler is not None:
        root.removeHandler(logs._handler)
        logs._handler = None
    root.setLevel(level)
    logs.set_role("master")


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_has_standard_fields_and_extras():
    out = io.StringIO()
    logs.setup_logging("json", role="worker", stream=out)
    extra = {"job_id": 7, "queue": "emails", "task": "send_welcome", "attempt": 2, "event": "x"}
    logging.getLogger("jobqd.worker").info("job %s done", 7, extra=extra)

    (line,) = _lines(out)
    record = json.loads(line)
    assert list(record)[:6] == ["ts", "level", "logger", "message", "role", "pid"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])
    assert record["level"] == "INFO"
    assert record["logger"] == "jobqd.worker"
    assert record["message"] == "job 7 done"
    assert record["role"] == "worker"
    assert record["pid"] == os.getpid()
    for key in (*logs.JOB_FIELDS, "event"):
        assert record[key] == extra[key]


def test_json_exception_is_one_string():
    out = io.StringIO()
    logs.setup_logging("json", stream=out)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logging.getLogger("t").exception("boom")

    (line,) = _lines(out)
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert record["exc_info"].startswith("Traceback")
    assert "ZeroDivisionError" in record["exc_info"]


def test_setup_again_replaces_handler_and_role():
    first, second = io.StringIO(), io.StringIO()
    logs.setup_logging("json", role="master", stream=first)
    logs.setup_logging("json", role="maintenance", stream=second)
    logging.getLogger("t").warning("once")

    assert first.getvalue() == ""
    (line,) = _lines(second)
    assert json.loads(line)["role"] == "maintenance"


def test_level_filters():
    out = io.StringIO()
    logs.setup_logging("json", level="warning", stream=out)
    logging.getLogger("t").info("hidden")
    logging.getLogger("t").warning("shown")
    assert [json.loads(line)["message"] for line in _lines(out)] == ["shown"]


def test_pid_and_role_are_read_after_fork():
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as stream:
        logs.setup_logging("json", role="master", stream=stream)
        pid = os.fork()
        if pid == 0:
            try:
                logs.set_role("worker")
                logging.getLogger("t").info("from child")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        logs.setup_logging("json", stream=io.StringIO())
    with os.fdopen(read_fd) as reader:
        record = json.loads(reader.read())
    assert record["pid"] == pid
    assert record["role"] == "worker"


def test_text_format():
    out = io.StringIO()
    logs.setup_logging("text", role="worker", stream=out)
    logging.getLogger("t").info("hello", extra={"error": 'bad "thing"', "note": ""})

    (line,) = _lines(out)
    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO  worker\[(\d+)\] hello "
        r'error="bad \\"thing\\"" note=""'
    )
    match = re.fullmatch(pattern, line)
    assert match and int(match.group(1)) == os.getpid()


def _after_level(line: str) -> str:
    return re.sub(r"^\S+ \S+ \S+\s+", "", line)


def test_text_names_the_process_and_says_the_job_in_words():
    out = io.StringIO()
    logs.setup_logging("text", role="worker", stream=out, name="worker emails#1")
    job = {"job_id": 42, "queue": "emails", "task": "send_welcome", "attempt": 2}
    log = logging.getLogger("jobqd.jobs")
    log.info("succeeded in 12ms", extra={**job, "event": "job_ended", "duration": 0.012})
    with logs.log_context(**job):
        log.warning("from the task", extra={"queue": "emails", "index": 1})

    first, second = (_after_level(line) for line in _lines(out))
    assert first.startswith("worker emails#1[")
    assert first.endswith("] job 42 send_welcome on emails, attempt 2: succeeded in 12ms")
    assert second.endswith("] job 42 send_welcome on emails, attempt 2: from the task")


def test_text_leaves_out_what_the_line_already_says():
    out = io.StringIO()
    logs.setup_logging("text", role="master", stream=out)
    child = {"child": "worker emails#0", "child_role": "worker", "child_pid": 4321}
    log = logging.getLogger("jobqd.master")
    log.info("started worker emails#0", extra={**child, "queue": "emails"})
    changes = {"replaced": ["worker emails#0", "worker emails#1"], "started": [], "retired": []}
    log.info("reloaded: 2 replaced", extra=changes)
    log.info("worker emails#0 exited: exit status 1", extra={**child, "exit_status": 1})

    started, reloaded, exited = (_after_level(line) for line in _lines(out))
    assert started.endswith("] started worker emails#0 pid=4321")
    assert exited.endswith("] worker emails#0 exited: exit status 1 pid=4321")
    assert reloaded.endswith('] reloaded: 2 replaced replaced="worker emails#0, worker emails#1"')


def test_json_keeps_every_field_and_the_host():
    out = io.StringIO()
    logs.setup_logging("json", role="master", stream=out, name="master")
    child = {"child": "worker emails#0", "child_role": "worker", "child_pid": 4321}
    logging.getLogger("jobqd.master").info("started", extra={**child, "replaced": ["a", "b"]})

    (line,) = _lines(out)
    record = json.loads(line)
    assert record["host"] == socket.gethostname()
    assert {key: record[key] for key in child} == child
    assert record["replaced"] == ["a", "b"]


def test_text_includes_traceback():
    out = io.StringIO()
    logs.setup_logging("text", stream=out)
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("t").error("failed", exc_info=True)
    text = out.getvalue()
    assert " ERROR master[" in text
    assert "Traceback" in text and "KeyError" in text


def test_auto_picks_text_on_tty_and_json_otherwise():
    tty, pipe = _Tty(), io.StringIO()
    logs.setup_logging("auto", stream=tty)
    logging.getLogger("t").info("a")
    logs.setup_logging("auto", stream=pipe)
    logging.getLogger("t").info("b")

    assert " INFO  master[" in tty.getvalue()
    assert json.loads(pipe.getvalue())["message"] == "b"


def test_auto_picks_journal_when_stream_is_journald(tmp_path, monkeypatch):
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.setup_logging("auto", stream=stream)
        logging.getLogger("t").warning("careful")
        logging.getLogger("t").info("fine")
        stream.seek(0)
        warning, info = stream.read().splitlines()

    assert warning.startswith("<4>{") and json.loads(warning[3:])["message"] == "careful"
    assert info.startswith("<6>{")


def test_journal_stream_of_another_file_is_ignored(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    out = io.StringIO()
    logs.setup_logging("auto", stream=out)
    logging.getLogger("t").info("x")
    assert out.getvalue().startswith("{")


def test_log_context_adds_fields_extra_wins():
    out = io.StringIO()
    logs.setup_logging("json", stream=out)
    log = logging.getLogger("t")
    with logs.log_context(job_id=1, queue="emails"):
        with logs.log_context(attempt=3):
            log.info("inner", extra={"queue": "override"})
        log.info("outer")
    log.info("after")

    inner, outer, after = (json.loads(line) for line in _lines(out))
    assert (inner["job_id"], inner["queue"], inner["attempt"]) == (1, "override", 3)
    assert (outer["job_id"], "attempt" in outer) == (1, False)
    assert "job_id" not in after


@pytest.mark.parametrize(("fmt", "level"), [("yaml", "info"), ("json", "loud")])
def test_rejects_unknown_format_or_level(fmt, level):
    with pytest.raises(ValueError):
        logs.setup_logging(fmt, level=level, stream=io.StringIO())

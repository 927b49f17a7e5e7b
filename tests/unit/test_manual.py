"""The man pages and docs/configuration.md against the code they are rendered from: every flag
and setting has a text, no text names a setting that is gone, the checked-in reference is what
the generator writes, and groff renders the pages without a warning."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from jobqd.cli import ctl, daemon, manual
from jobqd.config import reference

ROOT = Path(__file__).resolve().parents[2]


def test_every_flag_command_and_setting_has_a_text() -> None:
    assert manual.undocumented() == []


def test_a_setting_without_text_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(reference.TEXT, "queues.*.lease")
    assert manual.undocumented() == ["queues.*.lease: no text in jobqd/config/reference.py TEXT"]
    with pytest.raises(reference.UndocumentedSetting):
        manual.render_config()


def test_a_text_for_a_setting_that_does_not_exist_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(reference.TEXT, "queues.*.leese", "a typo")
    assert manual.undocumented() == ["queues.*.leese: a text for a setting that does not exist"]


def test_a_flag_without_help_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    build = ctl.build_parser

    def with_a_new_flag() -> argparse.ArgumentParser:
        parser = build()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices["status"].add_argument("--fresh", action="store_true")
        return parser

    monkeypatch.setattr(ctl, "build_parser", with_a_new_flag)
    assert manual.undocumented() == ["jobqctl status --fresh"]


def test_the_checked_in_reference_is_what_the_generator_writes() -> None:
    checked_in = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert checked_in == manual.render_markdown(), (
        "docs/configuration.md is stale: run "
        "`python -m jobqd.cli.manual --markdown docs/configuration.md`"
    )


def test_the_pages_name_every_flag_command_and_setting() -> None:
    pages = {
        "jobqd": manual.render_jobqd(),
        "jobqctl": manual.render_jobqctl(),
        "config": manual.render_config(),
    }
    for flag in ("\\-\\-check", "\\-\\-no\\-migrate", "\\-\\-version", "\\-\\-config FILE"):
        assert flag in pages["jobqd"]
    for command in manual.commands(ctl.build_parser()):
        assert f".SS {manual.roff(command)}\n" in pages["jobqctl"]
    for key in reference.dotted_keys():
        assert f"\\fB{manual.roff(key)}\\fR" in pages["config"]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (Debian groff)")
def test_groff_renders_the_pages_without_warnings(tmp_path: Path) -> None:
    for page in manual.write(tmp_path):
        result = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert (result.returncode, result.stderr) == (0, ""), page.name


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    version = metadata.version("jobqd")
    for name, main in (("jobqd", daemon.main), ("jobqctl", ctl.main)):
        with pytest.raises(SystemExit) as stopped:
            main(["--version"])
        assert stopped.value.code == 0
        assert capsys.readouterr().out == f"{name} {version}\n"


def test_the_commented_reference_file_names_every_setting() -> None:
    """etc/jobqd.yaml (installed as /etc/jobqd.yaml) shows every key with its default; its
    tasks and cron entries are comments, since an empty file must stay valid."""
    document = yaml.safe_load((ROOT / "etc" / "jobqd.yaml").read_text(encoding="utf-8"))
    missing = []
    for key in reference.dotted_keys():
        if key.startswith(("tasks.", "cron.")):
            continue
        node = document
        for part in key.replace("*", "default").split("."):
            if node is None:  # an optional section left unset (aging: null), its keys shown
                break
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert missing == []

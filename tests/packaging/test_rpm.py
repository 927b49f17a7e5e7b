"""The .rpm from packaging/rpm/jobqd.spec, built by Debian's rpmbuild (packaging/build-rpm.sh):
the same layout as the .deb, its config file and scriptlets, and the unpacked tree run the same
way as in test_deb (through the venv's own interpreter, see there)."""

from __future__ import annotations

import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = metadata.version("jobqd")
PYVER = "3.11"
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        shutil.which("rpmbuild") is None or shutil.which("rpm2archive") is None,
        reason="rpmbuild or rpm2archive missing (Debian rpm)",
    ),
]


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, check=False, timeout=300
    )


@pytest.fixture(scope="module")
def rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packaging-rpm")
    built = run(REPO / "packaging" / "build-rpm.sh", out)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob(f"jobqd-{VERSION}-1*.x86_64.rpm")
    return path


def test_files_config_and_requires(rpm: Path) -> None:
    files = set(run("rpm", "-qpl", rpm).stdout.split())
    for name in (
        "/opt/jobqd/bin/jobqd",
        "/opt/jobqd/bin/jobqctl",
        "/usr/bin/jobqd",
        "/usr/bin/jobqctl",
        "/etc/jobqd.yaml",
        "/usr/lib/systemd/system/jobqd.service",
        "/usr/lib/systemd/system/jobqd@.service",
        "/usr/lib/sysusers.d/jobqd.conf",
        "/usr/lib/tmpfiles.d/jobqd.conf",
        "/usr/share/man/man8/jobqd.8",
        "/usr/share/man/man1/jobqctl.1",
        "/usr/share/man/man5/jobqd.yaml.5",
        "/usr/share/jobqd/jobqd.env",
        "/var/lib/jobqd",
    ):
        assert name in files, name
    assert not [f for f in files if f.endswith(".pyc") or f.startswith("/usr/lib/.build-id")]
    assert run("rpm", "-qpc", rpm).stdout.split() == ["/etc/jobqd.yaml"]
    requires = run("rpm", "-qpR", rpm).stdout.split("\n")
    assert f"/usr/bin/python{PYVER}" in requires
    assert not [r for r in requires if "libpq" in r]  # the venv's bundled libpq is its own
    scripts = run("rpm", "-qp", "--scripts", rpm).stdout
    assert "systemd-sysusers --replace=/usr/lib/sysusers.d/jobqd.conf -" in scripts
    assert "useradd -r -g jobqd -d /var/lib/jobqd" in scripts
    assert "systemctl start" not in scripts and "enable --now" not in scripts


def test_the_unpacked_tree_runs(rpm: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    payload = subprocess.run(["rpm2archive", "-"], stdin=rpm.open("rb"), capture_output=True)
    assert payload.returncode == 0, payload.stderr
    subprocess.run(["tar", "-xz", "-C", str(root)], input=payload.stdout, check=True)
    python = root / "opt/jobqd/bin/python"
    shown = run(python, root / "opt/jobqd/bin/jobqctl", "--version", env=CLEAN_ENV)
    assert (shown.returncode, shown.stdout) == (0, f"jobqctl {VERSION}\n"), shown.stderr
    config = root / "etc/jobqd.yaml"
    checked = run(python, root / "opt/jobqd/bin/jobqd", "-c", config, "--check", env=CLEAN_ENV)
    assert (checked.returncode, checked.stdout) == (0, f"{config}: configuration ok\n")

"""The .deb as an operator gets it: built by packaging/build-deb.sh (dpkg-buildpackage), its
files, conffiles and maintainer scripts inspected, lintian clean, and the unpacked tree run.

The venv's scripts start with `#!/opt/jobqd/bin/python`, which does not exist on this host.
The unpacked tree is run through its own interpreter instead: ROOT/opt/jobqd/bin/python is a
symlink to /usr/bin/python3.X, and Python finds the venv from the path it was started by
(pyvenv.cfg beside bin/), so `ROOT/opt/jobqd/bin/python ROOT/opt/jobqd/bin/jobqd` runs the
packaged jobqd with the packaged dependencies, exactly as /usr/bin/jobqd would once installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
VERSION = metadata.version("jobqd")
PYVER = "3.11"  # /usr/bin/python3 on Debian 12, the interpreter the venv is built with
SITE = f"opt/jobqd/lib/python{PYVER}/site-packages"
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}

for tool, package in (
    ("dpkg-buildpackage", "dpkg-dev"),
    ("dh", "debhelper"),
    ("lintian", "lintian"),
):
    if shutil.which(tool) is None:
        pytestmark.append(pytest.mark.skip(reason=f"{tool} missing (Debian {package})"))
        break


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`args` run from /, so that no jobqd source tree is on a `python -c`'s path."""
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packaging-deb")
    built = run(REPO / "packaging" / "build-deb.sh", out)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob(f"jobqd_{VERSION}_*.deb")
    return path


@pytest.fixture(scope="module")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package unpacked into a throw-away root."""
    target = tmp_path_factory.mktemp("packaging-root")
    assert run("dpkg-deb", "-x", deb, target).returncode == 0
    return target


@pytest.fixture(scope="module")
def control(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("packaging-control") / "DEBIAN"
    assert run("dpkg-deb", "-e", deb, target).returncode == 0
    return target


def test_files(deb: Path) -> None:
    listing = run("dpkg-deb", "-c", deb).stdout.splitlines()
    entries = {line.split()[5].removeprefix("./"): line for line in listing}
    links = {name: line.split(" -> ")[1] for name, line in entries.items() if line.startswith("l")}
    assert links["usr/bin/jobqd"] == "/opt/jobqd/bin/jobqd"
    assert links["usr/bin/jobqctl"] == "/opt/jobqd/bin/jobqctl"
    assert links["opt/jobqd/bin/python3"] == f"/usr/bin/python{PYVER}"
    for name in (
        "opt/jobqd/bin/jobqd",
        "opt/jobqd/bin/jobqctl",
        "opt/jobqd/pyvenv.cfg",
        "etc/jobqd.yaml",
        "lib/systemd/system/jobqd.service",
        "lib/systemd/system/jobqd@.service",
        "usr/lib/sysusers.d/jobqd.conf",
        "usr/lib/tmpfiles.d/jobqd.conf",
        "usr/share/man/man8/jobqd.8.gz",
        "usr/share/man/man1/jobqctl.1.gz",
        "usr/share/man/man5/jobqd.yaml.5.gz",
        "usr/share/doc/jobqd/examples/jobqd.env",
        f"{SITE}/jobqd/__init__.py",
        f"{SITE}/psycopg/__init__.py",
        f"{SITE}/psycopg_pool/__init__.py",
    ):
        assert name in entries, name
    for migration in (REPO / "migrations").glob("*.sql"):
        assert f"{SITE}/jobqd/migrations/{migration.name}" in entries
    assert not [n for n in entries if n.endswith(".pyc") or "__pycache__" in n]
    assert not [n for n in entries if "/pip/" in n or n.startswith(f"{SITE}/pip")]
    assert entries["etc/jobqd.yaml"].startswith("-rw-r--r-- root/root")


def test_metadata_and_conffiles(deb: Path, control: Path) -> None:
    fields = dict(
        line.split(": ", 1)
        for line in run("dpkg-deb", "-f", deb).stdout.splitlines()
        if not line.startswith(" ")
    )
    assert fields["Package"] == "jobqd"
    assert fields["Version"] == VERSION
    depends = fields["Depends"]
    assert f"python{PYVER}" in depends
    assert re.search(r"\blibc6 \(>= [\d.]+\)", depends)
    assert "systemd | systemd-standalone-sysusers | adduser" in depends
    assert (control / "conffiles").read_text().split() == ["/etc/jobqd.yaml"]


def test_maintainer_scripts_start_nothing(control: Path) -> None:
    postinst = (control / "postinst").read_text()
    prerm = (control / "prerm").read_text()
    postrm = (control / "postrm").read_text()
    # The user: systemd-sysusers where it exists, else adduser with the same name and home.
    assert 'systemd-sysusers ${DPKG_ROOT:+--root="$DPKG_ROOT"} jobqd.conf' in postinst
    assert "adduser --system --group --home /var/lib/jobqd" in postinst
    # Enabled on install, never started; a running daemon is restarted on upgrade only.
    assert "deb-systemd-helper enable 'jobqd.service'" in postinst
    assert "jobqd@.service" not in postinst.split("deb-systemd-helper enable")[1].split("\n")[0]
    assert not re.search(r"deb-systemd-invoke (start|restart)\b", postinst)
    assert re.search(r'if \[ -n "\$2" \]; then\s+deb-systemd-invoke try-restart', postinst)
    # Stopped on removal, not on upgrade; purge forgets the secrets file it made.
    assert re.search(r'"\$1" = remove .*\n\s+deb-systemd-invoke stop jobqd.service', prerm)
    assert "deb-systemd-invoke stop 'jobqd@*.service'" in prerm
    assert not (control / "preinst").exists() or "stop" not in (control / "preinst").read_text()
    assert "rm -f /etc/jobqd/jobqd.env" in postrm
    assert "userdel" not in postrm and "deluser" not in postrm
    for script in ("postinst", "prerm", "postrm"):
        assert run("sh", "-n", control / script).returncode == 0, script


def test_lintian_passes(deb: Path) -> None:
    result = run("lintian", "--fail-on", "error,warning", deb)
    report = [line for line in result.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert (result.returncode, report) == (0, [])


def test_the_unpacked_tree_runs(root: Path, tmp_path: Path) -> None:
    python = root / "opt/jobqd/bin/python"
    where = run(python, "-c", "import jobqd, sys; print(jobqd.__file__, sys.prefix)", env=CLEAN_ENV)
    assert where.stdout.split() == [str(root / SITE / "jobqd/__init__.py"), str(root / "opt/jobqd")]
    # The wheels' compiled parts survived dh_strip.
    native = run(
        python,
        "-c",
        "import psycopg, yaml, setproctitle; print(psycopg.pq.__impl__, yaml.__with_libyaml__)",
        env=CLEAN_ENV,
    )
    assert native.stdout.split() == ["binary", "True"], native.stderr
    # The dashboard extra is in the package: `http.dashboard: true` works once installed.
    dashboard = run(
        python, "-c", "import jinja2, jobqd.http.dashboard.render; print('ok')", env=CLEAN_ENV
    )
    assert dashboard.stdout == "ok\n", dashboard.stderr
    assert (root / SITE / "jobqd/http/dashboard/static/htmx.min.js").is_file()

    config = tmp_path / "jobqd.yaml"
    config.write_text(
        "database: postgresql://jobqd@db.invalid/app\n"
        "imports: [jobqd.examples]\n"
        "queues: {default: {concurrency: 2}}\n"
        "cron: {tick: {schedule: '@hourly', task: jobqd.examples.tick}}\n"
    )
    checked = run(python, root / "opt/jobqd/bin/jobqd", "-c", config, "--check", env=CLEAN_ENV)
    assert (checked.returncode, checked.stdout) == (0, f"{config}: configuration ok\n"), (
        checked.stderr
    )
    shipped = root / "etc/jobqd.yaml"
    checked = run(python, root / "opt/jobqd/bin/jobqd", "-c", shipped, "--check", env=CLEAN_ENV)
    assert checked.returncode == 0, checked.stderr

    for name in ("jobqd", "jobqctl"):
        link = root / "usr/bin" / name
        assert os.readlink(link) == f"/opt/jobqd/bin/{name}"
        script = root / os.readlink(link).lstrip("/")
        assert script.read_text().startswith("#!/opt/jobqd/bin/python\n")
        shown = run(python, script, "--version", env=CLEAN_ENV)
        assert (shown.returncode, shown.stdout) == (0, f"{name} {VERSION}\n")


def test_no_build_paths_left(root: Path) -> None:
    found = run("grep", "-rlI", "jobqd-deb.", root / "opt/jobqd")
    assert (found.returncode, found.stdout) == (1, "")
    assert "/opt/jobqd" in (root / "opt/jobqd/pyvenv.cfg").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_verify_against_the_installed_paths(root: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify --root` checks ExecStart= and the rest inside the unpacked
    tree; it needs the system's own targets there, so they are copied in (not the host's
    /usr/bin: a missing /usr/bin/jobqd in the tree fails the check)."""
    verify_root = tmp_path / "root"
    shutil.copytree(root, verify_root, symlinks=True)
    shutil.copytree(
        "/lib/systemd/system",
        verify_root / "usr/lib/systemd/system",
        symlinks=True,
        dirs_exist_ok=True,
    )
    units = ("jobqd.service", "jobqd@example.service")
    verified = run("systemd-analyze", "verify", "--man=no", f"--root={verify_root}", *units)
    assert (verified.returncode, verified.stderr) == (0, "")
    security = run(
        "systemd-analyze",
        "security",
        "--offline=yes",
        f"--root={verify_root}",
        "--threshold=20",
        "jobqd.service",
    )
    assert security.returncode == 0, security.stdout[-2000:]
    exposure = re.search(r"Overall exposure level for jobqd.service: ([\d.]+)", security.stdout)
    assert exposure and float(exposure.group(1)) <= 2.0, security.stdout[-500:]
    (verify_root / "usr/bin/jobqd").unlink()
    broken = run("systemd-analyze", "verify", "--man=no", f"--root={verify_root}", "jobqd.service")
    assert broken.returncode != 0 and "/usr/bin/jobqd" in broken.stderr


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff missing (Debian groff-base)")
def test_installed_man_pages_render(root: Path) -> None:
    for page in sorted((root / "usr/share/man").glob("man*/*.gz")):
        text = run("zcat", page).stdout
        rendered = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        assert (rendered.returncode, rendered.stderr) == (0, ""), page.name
        assert "jobqd" in rendered.stdout
    assert sys.version_info >= (3, 11)


def can_overlay() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = run("unshare", "--mount", "sh", "-c", "mount -t tmpfs probe /mnt")
    return probe.returncode == 0


@pytest.mark.skipif(not can_overlay(), reason="needs root and mount namespaces (unshare -m)")
def test_install_remove_purge(deb: Path, tmp_path: Path) -> None:
    """dpkg -i, -r and -P for real, in a mount namespace over tmpfs overlays (the script says
    how): the user and directories appear, the unit is enabled (that nothing starts it is
    test_maintainer_scripts_start_nothing's), the installed commands run by their own
    shebangs; removal keeps the edited conffile, purge takes it and the env file, and the
    user stays. Then once more without systemd-sysusers and systemd-tmpfiles: adduser makes
    the same user."""
    scratch = tmp_path / "namespace"
    scratch.mkdir()
    script = Path(__file__).with_name("install_in_namespace.sh")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", str(script), scratch, deb],
        capture_output=True,
        text=True,
        env={**CLEAN_ENV, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        cwd="/",
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    found = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert found == {
        "user": "jobqd:/var/lib/jobqd:/usr/sbin/nologin",
        "group": "jobqd",
        "env_file": "640 root jobqd",
        "etc_dir": "750 root jobqd",
        "state_dir": "750 jobqd jobqd",
        "enabled": "/lib/systemd/system/jobqd.service",
        "template_enabled": "0",
        "version": f"jobqctl {VERSION}",
        "check": "/etc/jobqd.yaml: configuration ok",
        "bytecode": found["bytecode"],
        "man": "/usr/share/man/man5/jobqd.yaml.5.gz",
        "removed_venv": "yes",
        "removed_bin": "yes",
        "kept_conffile": "# a local edit of the conffile",
        "kept_env_file": "yes",
        "purged_conffile": "yes",
        "purged_env_file": "yes",
        "purged_enabled": "yes",
        "kept_user": "jobqd",
        "fallback_user": "jobqd:/var/lib/jobqd:/usr/sbin/nologin",
        "fallback_state_dir": "750 jobqd jobqd",
        "fallback_env_file": "640 root jobqd",
    }
    assert int(found["bytecode"]) > 100  # postinst compiled the venv

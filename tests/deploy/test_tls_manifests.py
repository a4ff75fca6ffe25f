"""The TLS deployment examples: the Kubernetes Deployment with its Secret, the supervisord config, in effect.

The Deployment is checked as YAML against the plain one (it must stay its
drop-in replacement); the supervisord config is loaded by supervisor's own
option parser, and its program's environment is run: ``python -m app``
with those variables pointing at real files must serve TLS, and ``check``
with the same environment must report healthy over TLS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.exits import Probe
from tests.server import REPO, start_server
from tests.tls_support import make_pki

K8S = REPO / "deploy" / "k8s"


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def test_k8s_tls_deployment_mounts_the_secret_as_files() -> None:
    plain, tls = _load(K8S / "deployment.yaml"), _load(K8S / "tls" / "deployment.yaml")
    assert tls["metadata"]["name"] == plain["metadata"]["name"]  # replaces it: the Service routes to it unchanged
    assert tls["spec"]["template"]["metadata"]["labels"] == plain["spec"]["template"]["metadata"]["labels"]
    pod = tls["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (volume,) = pod["volumes"]
    (mount,) = container["volumeMounts"]
    assert volume["secret"]["secretName"] == "zen-tls"
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # the group may read them
    assert mount["name"] == volume["name"]
    assert mount["readOnly"] is True
    assert "subPath" not in mount  # so the kubelet can refresh renewed files in place
    for name, key in (("TLS_CERT_FILE", "tls.crt"), ("TLS_KEY_FILE", "tls.key")):
        assert env[name] == f"{mount['mountPath']}/{key}"  # kubernetes.io/tls Secret keys
    assert "ca.crt" in (K8S / "tls" / "deployment.yaml").read_text()  # the mutual TLS key, documented
    plain_pod = plain["spec"]["template"]["spec"]
    for probe in ("readinessProbe", "livenessProbe"):  # check reads TLS_CERT_FILE: the probes stay as they are
        assert container[probe] == plain_pod["containers"][0][probe]
    assert pod["terminationGracePeriodSeconds"] == plain_pod["terminationGracePeriodSeconds"]


def _supervisord_program(conf: Path) -> dict[str, str]:
    """The zen-server program's environment, as supervisor itself parses the file."""
    code = (
        "import sys, json; from supervisor.options import ServerOptions; o = ServerOptions(); "
        "o.configfile = sys.argv[1]; o.process_config(do_usage=False); "
        "(g,) = [g for g in o.process_group_configs if g.name == 'zen-server']; "
        "print(json.dumps(g.process_configs[0].environment))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(conf)], capture_output=True, text=True, check=True)
    env = yaml.safe_load(out.stdout)
    assert isinstance(env, dict)
    return env


def test_supervisord_tls_config_runs_a_tls_server(tmp_path: Path) -> None:
    pytest.importorskip("supervisor")
    env = _supervisord_program(REPO / "deploy" / "supervisord-tls.conf")
    assert set(env) == {"TLS_CERT_FILE", "TLS_KEY_FILE"}
    pki = make_pki(tmp_path)
    # The same variables, pointing at real files instead of /etc/zen/tls.
    real = {"TLS_CERT_FILE": str(pki.server[0]), "TLS_KEY_FILE": str(pki.server[1])}
    with start_server({**real, "WORKERS": "1"}) as server:
        check = subprocess.run(
            [sys.executable, "-m", "app", "check"],
            cwd=REPO,
            env={**os.environ, **real, "PORT": str(server.port)},
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    assert check.returncode == Probe.HEALTHY, check.stderr
    assert "over TLS" in check.stdout

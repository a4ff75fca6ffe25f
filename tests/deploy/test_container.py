"""The Dockerfile, built and run for real with podman on local Debian base images, one per tested Python.

No container registry is reachable here, so the base images are Debian root
filesystems (debootstrap, python3 + python3-venv) imported into podman:
bookworm (Python 3.11, the host's) and trixie (Python 3.13, the release the
Dockerfile's default python:3.13-slim is built on).  The image is built
and run on both in every run: what differs between them (the interpreter,
its venv and ensurepip, the C library the wheels load against) is exactly
what a user building on either would hit, and a build costs under a minute
once the root filesystems are cached.  The Dockerfile's default base itself
is not pulled.  About 5 minutes from scratch (two debootstraps, pip inside
each build), about 2 with the cached root filesystems.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from typing import Any

import pytest

from app.tools.client import ZenClient
from tests.deploy.podman import SUITES, pip_build_args
from tests.deploy.podman import Podman as PodmanCli
from tests.deploy.support import ANSWER, REPO, wait_answer, wait_for
from tests.server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module", params=sorted(SUITES), ids=lambda s: f"{s}-py{'.'.join(map(str, SUITES[s]))}")
def suite(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def image(podman: PodmanCli, base_image: Callable[[str], str], suite: str) -> str:
    base = base_image(suite)
    tag = f"localhost/zen-server:test-{suite}-{secrets.token_hex(4)}"
    podman.run(
        "build",
        "--format",
        "docker",  # the OCI format has no HEALTHCHECK
        "--build-arg",
        f"BASE_IMAGE={base}",
        *pip_build_args(),
        "--tag",
        tag,
        str(REPO),
        timeout=600,
    )
    return tag


def _events(podman: PodmanCli, name: str) -> list[dict[str, Any]]:
    out = podman.run("logs", name, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_image_runs_answers_is_healthy_and_drains_on_stop(podman: PodmanCli, image: str, suite: str) -> None:
    port = free_port()
    name = f"zen-test-{secrets.token_hex(4)}"
    podman.run(
        "run",
        "--detach",
        "--name",
        name,
        "--env",
        f"PORT={port}",
        "--env",
        "WORKERS=2",
        "--env",
        "GRACEFUL_TIMEOUT=10",
        "--publish",
        f"127.0.0.1:{port}:{port}",
        image,
    )
    assert wait_answer(port, timeout=60) == ANSWER
    with ZenClient("127.0.0.1", port) as client:
        assert client.ask_all([b"Explicit is better than?", b"Simple is better than?"]) == [b"Implicit.", b"Complex."]
    ready = wait_for(
        "server_ready in the logs",
        lambda: next((e for e in _events(podman, name) if e["event"] == "server_ready"), None),
        timeout=30,
    )
    assert (ready["host"], ready["port"], ready["workers"]) == ("0.0.0.0", port, 2)  # the image's HOST default
    assert podman.run("exec", name, "id", "-u").stdout.strip() == "10001"  # not root
    # The image ships the compiled build (the builder stage has a C compiler; the final one none).
    assert "(compiled, Python " in podman.run("exec", name, "python", "-m", "app", "--version").stdout
    version = podman.run("exec", name, "python", "-c", "import sys; print(*sys.version_info[:2])").stdout.split()
    assert tuple(map(int, version)) == SUITES[suite]  # the venv runs the base image's Python

    health = podman.run("healthcheck", "run", name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    status = podman.run("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
    assert status == "healthy"

    _stop_drains_in_flight_question(podman, name, port)
    assert podman.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    events = _events(podman, name)
    assert any(e["event"] == "worker_draining" for e in events)
    assert [e["exit_code"] for e in events if e["event"] == "master_stopped"] == [0]
    podman.run("rm", name)


def _stop_drains_in_flight_question(podman: PodmanCli, name: str, port: int) -> None:
    """`podman stop` while a question is half sent: it is still answered, then the server exits."""
    with ZenClient("127.0.0.1", port, timeout=20) as client:
        assert client.ask(b"Beautiful is better than?") == ANSWER
        client.send(b"Flat is better")
        stopper = threading.Thread(target=lambda: podman.run("stop", "--time", "30", name, timeout=60))
        stopper.start()
        try:
            wait_for(
                "the master to log 'stopping'",
                lambda: any(e["event"] == "stopping" for e in _events(podman, name)),
                timeout=20,
            )
            client.send(b" than?")
            assert client.read_answers(1) == [b"Nested."]
        finally:
            stopper.join(timeout=90)
    assert not stopper.is_alive()
    wait_for("the container to exit", lambda: _state(podman, name) == "exited", timeout=30)


def _state(podman: PodmanCli, name: str) -> str:
    return podman.run("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()

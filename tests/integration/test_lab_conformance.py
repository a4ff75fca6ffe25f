"""PROTOCOL.md's conformance table against every lab server and the production server.

One server process per architecture (module-scoped), every case of
``tests.conformance`` against it over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from app.lab import SERVERS
from app.tools.client import ZenClient
from app.tools.process import RunningServer, running_server, stop_server
from tests.conformance import CASES, Case, check_case

NAMES = [s.name for s in SERVERS]


@pytest.fixture(scope="module", params=NAMES)
def lab_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    with running_server(request.param, env={"WORKERS": "2", "LAB_POOL_SIZE": "4"}) as server:
        yield server


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(lab_server: RunningServer, case: Case) -> None:
    check_case(lab_server.host, lab_server.port, case, timeout=10.0)
    assert lab_server.proc.poll() is None, "the server died"


def test_every_architecture_of_the_issue_is_registered() -> None:
    expected = {
        "single",
        "threadpool",
        "thread",
        "fork",
        "prefork",
        "poll",
        "asyncio-protocol",
        "asyncio-protocol-uvloop",
        "asyncio-streams",
        "asyncio-streams-uvloop",
        "worker",
        "percore",
    }
    assert set(NAMES) == expected


def test_lab_list_names_every_server() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "app", "lab", "--list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == NAMES
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines())


def test_lab_unknown_name_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app", "lab", "no-such-server"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 2
    assert "unknown lab server" in proc.stderr


@pytest.mark.parametrize("name", ["fork", "prefork", "percore"])
def test_stop_ends_every_child(name: str) -> None:
    """SIGTERM to a multi-process lab server ends its children too, even with a client connected."""
    with (
        running_server(name, env={"WORKERS": "2", "LAB_POOL_SIZE": "3"}) as server,
        ZenClient(server.host, server.port) as client,
    ):
        assert client.ask(b"Beautiful is better than?") == b"Ugly."
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert children, "a multi-process server has children"
        stop_server(server)
        assert server.proc.returncode == 0
        _gone, alive = psutil.wait_procs(children, timeout=0.1)
        assert not alive, f"children left running: {alive}"

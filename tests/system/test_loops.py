"""``python -m app`` on each loop ``LOOP`` allows, and without uvloop installed.

The absence is real to every process of the server: a ``sitecustomize``
on ``PYTHONPATH`` (inherited by the workers, which are new interpreters)
sets ``sys.modules["uvloop"] = None``, so ``import uvloop`` raises
ImportError as it does where no wheel was installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core import zen
from app.exits import Exit
from app.tools.client import ZenClient
from tests.server import ServerProcess, start_server


@pytest.fixture
def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """The environment of a server whose processes cannot import uvloop."""
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["uvloop"] = None\n', encoding="utf-8")
    return {"PYTHONPATH": str(tmp_path)}


def _serves(server: ServerProcess) -> None:
    with ZenClient("127.0.0.1", server.port, timeout=5) as client:
        assert client.ask(zen.PROBE_QUESTION) == zen.PROBE_ANSWER


@pytest.mark.parametrize(("loop", "runs"), [(None, "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_each_loop_serves_and_every_worker_says_which(loop: str | None, runs: str) -> None:
    env = {"WORKERS": "2"} if loop is None else {"WORKERS": "2", "LOOP": loop}
    with start_server(env) as server:
        _serves(server)
        assert [e["loop"] for e in server.find("worker_ready")] == [runs, runs]
        assert not server.find("loop_fallback")


def test_auto_without_uvloop_serves_on_asyncios_loop_with_one_warning(without_uvloop: dict[str, str]) -> None:
    with start_server({**without_uvloop, "WORKERS": "2", "LOOP": "auto"}) as server:
        _serves(server)
        assert [e["loop"] for e in server.find("worker_ready")] == ["asyncio", "asyncio"]
        (warning,) = server.find("loop_fallback")
        assert warning["level"] == "warning"
        assert warning["loop"] == "asyncio"
        assert "uvloop" in warning["reason"]


def test_uvloop_without_uvloop_is_a_boot_failure_with_exit_2(without_uvloop: dict[str, str]) -> None:
    with start_server({**without_uvloop, "WORKERS": "2", "LOOP": "uvloop"}, ready=False) as server:
        event = server.wait_event("loop_unavailable")
        assert event["level"] == "error"
        assert "LOOP=asyncio" in event["error"]
        assert server.wait() == Exit.CONFIG
        assert not server.find("worker_ready")
        assert server.find("worker_boot_failed")

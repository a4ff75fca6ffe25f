"""The Procfile under honcho, the way a Heroku-style platform runs it.

The platform sets PORT and WEB_CONCURRENCY and sends SIGTERM to every
process of the dyno, then SIGKILL 30 seconds later: the server must listen
on $PORT with WEB_CONCURRENCY workers and exit cleanly well within that.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from tests.deploy.support import ANSWER, REPO, VENV_BIN, wait_answer, wait_for
from tests.server import free_port

pytestmark = pytest.mark.slow
HEROKU_KILL_AFTER = 30.0


def test_procfile_declares_the_web_process() -> None:
    lines = [ln for ln in (REPO / "Procfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    name, command = lines[0].split(":", 1)
    assert name == "web"
    assert command.strip().endswith("python -m app")


class Output:
    """honcho's output lines, collected by a thread so the pipe never fills."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        """The server's JSON log lines (honcho prefixes each with 'time web.1 | ')."""
        out = []
        for line in list(self.lines):
            _, sep, rest = line.partition("| ")
            if sep and rest.startswith("{"):
                out.append(json.loads(rest))
        return out

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.fixture
def honcho(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Output, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKERS", "LOG_FORMAT")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the platform's `python` is the app's
        WEB_CONCURRENCY="3",
        HOST="127.0.0.1",  # tests listen on loopback only
        GRACEFUL_TIMEOUT="20",
    )
    honcho = [str(VENV_BIN / "honcho"), "--no-colour", "-f", str(REPO / "Procfile"), "-d", str(tmp_path)]
    proc = subprocess.Popen(
        [*honcho, "start", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    started: list[int] = []
    try:
        yield proc, Output(proc.stdout), port
    finally:
        started = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in started:  # only processes this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_honcho_serves_on_port_with_web_concurrency_and_stops_on_sigterm(
    honcho: tuple[subprocess.Popen[str], Output, int],
) -> None:
    proc, output, port = honcho
    assert wait_answer(port, timeout=30) == ANSWER
    ready = wait_for("server_ready", lambda: [e for e in output.events() if e["event"] == "server_ready"], timeout=10)
    assert ready[0]["port"] == port
    assert ready[0]["workers"] == 3  # WEB_CONCURRENCY
    tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]

    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=HEROKU_KILL_AFTER)
    elapsed = time.monotonic() - start
    output.join(timeout=5)
    assert elapsed < HEROKU_KILL_AFTER
    stopped = [e for e in output.events() if e["event"] == "master_stopped"]
    assert stopped, "\n".join(output.lines[-20:])
    assert stopped[0]["exit_code"] == 0
    assert any(re.search(r"web\.1 stopped \(rc=0\)", line) for line in output.lines), output.lines[-5:]
    assert not [pid for pid in tree if psutil.pid_exists(pid)], "processes left behind"

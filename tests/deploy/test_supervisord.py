"""The repository's supervisord.conf under a real supervisord (supervisor from PyPI).

supervisord runs the repository's own config file, reached through a
symlink in a short temporary directory: %(here)s is then that directory,
so the run/log paths are the test's own (no clash with a supervisord a
developer runs from the checkout), the AF_UNIX socket path stays short
whatever the checkout path, and any path not written through %(here)s
would break the test.  The server's settings come from supervisord's own
environment, as in production.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.tools.client import ZenClient
from tests.deploy.support import ANSWER, REPO, VENV, VENV_BIN, wait_answer, wait_for
from tests.server import free_port

pytestmark = pytest.mark.slow
PROGRAM = "zen-server"


@dataclass
class Supervisor:
    """A running supervisord and the paths it uses."""

    home: Path
    port: int
    proc: subprocess.Popen[bytes]
    elsewhere: Path
    seen_pids: set[int] = field(default_factory=set)

    @property
    def conf(self) -> Path:
        return self.home / "supervisord.conf"

    @property
    def program_log(self) -> Path:
        return self.home / "log" / f"{PROGRAM}.log"

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run supervisorctl from an unrelated directory, as an operator would."""
        return subprocess.run(
            [str(VENV_BIN / "supervisorctl"), "-c", str(self.conf), *args],
            cwd=self.elsewhere,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def master_pid(self) -> int | None:
        out = self.ctl("pid", PROGRAM).stdout.strip()
        return int(out) if out.isdigit() and int(out) > 0 else None

    def running_pid(self) -> int | None:
        """The master's PID once supervisord reports the program RUNNING."""
        if "RUNNING" not in self.ctl("status", PROGRAM).stdout:
            return None
        pid = self.master_pid()
        if pid is not None:
            self.seen_pids.add(pid)
            self.seen_pids.update(c.pid for c in _children(pid))
        return pid

    def events(self) -> list[dict[str, Any]]:
        """Every log line of the program, each of which must be a JSON object."""
        if not self.program_log.exists():
            return []
        lines = self.program_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    home = Path(tempfile.mkdtemp(prefix="zs-", dir="/tmp"))
    (home / "supervisord.conf").symlink_to(REPO / "supervisord.conf")
    (home / ".venv").symlink_to(VENV)
    (home / "run").mkdir()
    (home / "log").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LOG_FORMAT"}  # auto: JSON, since stdout is a file
    env.update(PORT=str(port), WORKERS="2", GRACEFUL_TIMEOUT="8", REQUEST_TIMEOUT="20")
    proc = subprocess.Popen(
        [str(VENV_BIN / "supervisord"), "--nodaemon", "-c", str(home / "supervisord.conf")],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sup = Supervisor(home=home, port=port, proc=proc, elsewhere=elsewhere)
    try:
        yield sup
    finally:
        sup.seen_pids.update(c.pid for c in _children(proc.pid))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # supervisord stops its programs, then exits
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in sup.seen_pids:  # only processes this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_status_answer_kill9_restart_json_logs_graceful_stop_and_shutdown(supervisor: Supervisor) -> None:
    sup = supervisor
    first = wait_for("supervisorctl status RUNNING", sup.running_pid, timeout=30)
    assert wait_answer(sup.port) == ANSWER
    workers = [c.pid for c in _children(first)]
    assert len(workers) == 2, workers

    # kill -9 of the master: supervisord restarts it, the old workers follow
    # their master out (PDEATHSIG), and the new master serves again.
    os.kill(first, signal.SIGKILL)
    second = wait_for("a new master", lambda: (p := sup.running_pid()) != first and p, timeout=30)
    assert wait_answer(sup.port) == ANSWER
    wait_for("the old workers to exit", lambda: not any(_alive(w) for w in workers), timeout=30)
    # both masters logged server_ready (the first worker may answer before the
    # master has logged it), in the program's log file, as JSON lines
    wait_for("two server_ready events in the log", lambda: sup.count("server_ready") >= 2, timeout=20)
    assert {e["port"] for e in sup.events() if e["event"] == "server_ready"} == {sup.port}

    _graceful_stop_answers_in_flight_question(sup, second)

    down = sup.ctl("shutdown")
    assert down.returncode == 0, down
    assert sup.proc.wait(timeout=30) == 0
    assert not [pid for pid in sup.seen_pids if _alive(pid)], "processes left behind"
    assert not (sup.home / "run" / "supervisor.sock").exists()


def _graceful_stop_answers_in_flight_question(sup: Supervisor, master: int) -> None:
    """`supervisorctl stop` while a question is half sent: it is still answered, then exit 0."""
    stopping_before = sup.count("stopping")
    with ZenClient("127.0.0.1", sup.port, timeout=20) as client:
        assert client.ask(b"Beautiful is better than?") == ANSWER
        client.send(b"Explicit is better")  # in flight: started, not complete
        result: list[subprocess.CompletedProcess[str]] = []
        stopper = threading.Thread(target=lambda: result.append(sup.ctl("stop", PROGRAM)))
        stopper.start()
        try:
            wait_for("the master to log 'stopping'", lambda: sup.count("stopping") > stopping_before, timeout=20)
            client.send(b" than?")
            assert client.read_answers(1) == [b"Implicit."]
        finally:
            stopper.join(timeout=60)
    assert result, "supervisorctl stop did not return"
    assert "stopped" in result[0].stdout, result[0]
    wait_for("master_stopped in the log", lambda: sup.count("master_stopped"), timeout=10)
    stopped = [e for e in sup.events() if e["event"] == "master_stopped"]
    assert stopped[-1]["exit_code"] == 0
    assert not _alive(master)
    assert "STOPPED" in sup.ctl("status", PROGRAM).stdout
    supervisord_log = (sup.home / "log" / "supervisord.log").read_text()
    assert f"stopped: {PROGRAM} (exit status 0)" in supervisord_log

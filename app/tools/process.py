"""Starting a lab server as a child process, waiting for it, measuring it, stopping it.

Owns: ``python -m app lab NAME`` as a subprocess with its log in a file,
waiting for its ``server_ready`` event (which carries the port), the RSS,
CPU time and thread/process counts of its whole process tree, and ending
exactly the processes it started (the server, then any child left over).
Used by ``app.tools.compare`` and the integration tests.

Never: kills by name, or anything outside the tree of the process it spawned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import psutil

READY_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 10.0


@dataclass
class Tree:
    """A snapshot of a server's process tree."""

    rss: int  # bytes, summed over the processes (shared pages counted in each)
    uss: int  # bytes only these processes use (what they really cost), 0 if unreadable
    processes: int
    threads: int
    cpu: float  # seconds, user + system, including reaped children
    cpu_by_pid: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclass
class RunningServer:
    """A lab server child process and the port it serves on."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    host: str
    log_path: Path

    def tree(self, *, uss: bool = False) -> Tree:
        """Measure the server process and all its descendants now."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return Tree(0, 0, 0, 0, 0.0)
        rss = mem_uss = threads = 0
        cpu = 0.0
        alive = 0
        by_pid: dict[int, float] = {}
        for proc in procs:
            try:
                with proc.oneshot():
                    if uss:
                        info = proc.memory_full_info()
                        rss += info.rss
                        mem_uss += info.uss
                    else:
                        rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    threads += proc.num_threads()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            alive += 1
            own = times.user + times.system
            by_pid[proc.pid] = own
            cpu += own + times.children_user + times.children_system
        return Tree(rss, mem_uss, alive, threads, cpu, by_pid)

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON events the server logged so far."""
        return list(_events(self.log_path.read_bytes()))


def _events(data: bytes) -> Iterator[dict[str, Any]]:
    for line in data.splitlines():
        if line.startswith(b"{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)


def _wait_ready(proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in _events(Path(log.name).read_bytes()):
            if event.get("event") == "server_ready":
                return int(event["port"])
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"no server_ready within {timeout}s (exit code {proc.poll()}): {Path(log.name).read_text()}")


def start_server(
    name: str, *, env: Mapping[str, str] | None = None, host: str = "127.0.0.1", timeout: float = READY_TIMEOUT
) -> RunningServer:
    """Start ``python -m app lab NAME`` on a free port and wait until it is ready.

    ``env`` overrides variables of this process's environment.  The caller
    must :func:`stop_server` the result (or use :func:`running_server`).
    """
    full = {**os.environ, "HOST": host, "PORT": "0", "LOG_FORMAT": "json", "GRACEFUL_TIMEOUT": "2", **(env or {})}
    log = tempfile.NamedTemporaryFile(prefix=f"lab-{name}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "app", "lab", name],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full,
    )
    log.close()
    server = RunningServer(name, proc, 0, host, Path(log.name))
    try:
        server.port = _wait_ready(proc, log, timeout)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: RunningServer, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM the server, wait, then SIGKILL it and every descendant still alive; returns its exit code."""
    try:
        descendants = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout)
    _gone, alive = psutil.wait_procs(descendants, timeout=2.0)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=2.0)
    with contextlib.suppress(OSError):
        server.log_path.unlink()
    return server.proc.returncode


@contextlib.contextmanager
def running_server(name: str, *, env: Mapping[str, str] | None = None) -> Iterator[RunningServer]:
    """``start_server`` as a context manager that always stops the server."""
    server = start_server(name, env=env)
    try:
        yield server
    finally:
        stop_server(server)

"""Run ``python -m app`` as a real subprocess and follow its JSON log events.

Used by the system, chaos and deploy suites: start with :func:`start_server`
(waits for the ``server_ready`` event), then :meth:`ServerProcess.wait_event`
for whatever the test expects.  Stops only the process it started, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

Event = dict[str, Any]


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A running ``python -m app`` whose stdout JSON lines are collected as events."""

    def __init__(self, env: Mapping[str, str], args: tuple[str, ...] = (), *, wrapper: tuple[str, ...] = ()) -> None:
        """Start ``wrapper + python -m app + args`` (a wrapper such as ``ip netns exec NS`` must exec)."""
        self.events: list[Event] = []
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "app", *args],
            cwd=REPO,
            env={**os.environ, "LOG_FORMAT": "json", **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = int(env.get("PORT", "0"))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "_unparsed", "line": line}
            with self._cond:
                self.lines.append(line)
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_event(
        self, name: str, predicate: Callable[[Event], bool] = lambda _e: True, *, timeout: float = 15.0, start: int = 0
    ) -> Event:
        """Wait for the first event ``name`` (from index ``start``) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[start:]:
                    if event.get("event") == name and predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    seen = [e.get("event") for e in self.events[-30:]]
                    raise AssertionError(f"no {name!r} event within {timeout}s; last events: {seen}")
                self._cond.wait(min(left, 0.2))

    def find(self, name: str) -> list[Event]:
        """Every event ``name`` seen so far."""
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    def worker_pids(self) -> dict[int, int]:
        """slot -> pid of the workers currently running (from worker_spawned/worker_exited)."""
        current: dict[int, int] = {}
        with self._cond:
            events = list(self.events)
        exited = {e["pid"] for e in events if e.get("event") == "worker_exited"}
        for e in events:
            if e.get("event") == "worker_spawned" and e["pid"] not in exited:
                current[e["slot"]] = e["pid"]
        return current

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 40.0) -> int:
        """Wait for the master to exit; return its exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode("utf-8", "replace")

    def kill(self) -> None:
        """End the master and any worker it left, by PID (clean-up on failure)."""
        if self.proc.poll() is None:
            pids = list(self.worker_pids().values())
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._reader.join(5)


@contextmanager
def start_server(env: Mapping[str, str] | None = None, *, ready: bool = True) -> Iterator[ServerProcess]:
    """Start ``python -m app`` on a free port (unless PORT is given) and wait until it serves."""
    env = dict(env or {})
    env.setdefault("PORT", str(free_port()))
    env.setdefault("WORKERS", "2")
    server = ServerProcess(env)
    try:
        if ready:
            server.wait_event("server_ready")
        yield server
    finally:
        server.kill()
        for stream in (server.proc.stdout, server.proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def serve_badly(reply: Callable[[socket.socket, bytes], None]) -> Iterator[int]:
    """A tiny server on 127.0.0.1 that calls ``reply`` for every chunk it receives."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while not stop.is_set() and (data := conn.recv(4096)):
                    reply(conn, data)
            except OSError:
                pass  # zenload closed it after counting the error

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _addr = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()

"""The server under attack: ``python -m app`` started as a subprocess, watched through its JSON log.

Owns: starting the real master (WORKERS=2 unless told otherwise) on a free
loopback port with short timeouts, waiting for its ``server_ready`` event,
reading its JSON log events, finding its workers, measuring its memory and
file descriptors, and stopping it by PID.

Never: signals or kills any process it did not start (workers are found as
children of the master it started), and never sleeps in the hope that
something happened: every wait polls a condition against a deadline.

Resource handling: :func:`open_server` is a context manager; on exit the
master gets SIGTERM, then SIGKILL after a grace period, and so does every
worker it left behind.  The log is a file (a pipe that the test reads too
slowly would block the server's ``write``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil

from tests.server import free_port

Event = dict[str, Any]

#: Short settings so that timeouts and drains happen within a test's budget.
#: GRACEFUL_TIMEOUT is long enough that a drain never has to cut anything.
CHAOS_ENV: dict[str, str] = {
    "HOST": "127.0.0.1",
    "WORKERS": "2",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "info",
    "IDLE_TIMEOUT": "5",
    "REQUEST_TIMEOUT": "3",
    "GRACEFUL_TIMEOUT": "15",
    "DRAIN_QUIET": "1",
}
START_TIMEOUT = 20.0


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to ``wanted`` (and the hard one, if allowed: root); returns it.

    The servers started afterwards inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))
            hard = wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def listen_queues(port: int) -> list[int]:
    """Connections waiting in the accept queue of each listener on 127.0.0.1:``port`` (/proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":  # state 0A = LISTEN; rx_queue = accept backlog
            queues.append(int(fields[4].split(":")[1], 16))
    return queues


class LogFile:
    """The server's log file, read incrementally into parsed events."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[Event] = []
        self.raw: list[bytes] = []
        self._offset = 0
        self._rest = b""

    def refresh(self) -> list[Event]:
        """Read what was written since the last call; return every event so far."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:  # the server's temporary directory is gone: everything was read
            return self.events
        self._offset += len(data)
        *lines, self._rest = (self._rest + data).split(b"\n")
        for line in lines:
            self.raw.append(line)
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict):
                    self.events.append(event)
        return self.events

    def named(self, name: str, **fields: Any) -> list[Event]:
        """Events called ``name`` whose fields include ``fields``."""
        return [e for e in self.refresh() if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]

    def tail(self, count: int = 30) -> str:
        """The last ``count`` lines, leaving out the load's routine closes."""
        self.refresh()
        lines = [line for line in self.raw if b'"reason":"eof"' not in line]
        return "\n".join(line.decode("utf-8", "backslashreplace") for line in lines[-count:])


class Server:
    """A running ``python -m app`` master and the means to watch and hurt it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: LogFile, env: dict[str, str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.log = log
        self.env = env
        self.addr = ("127.0.0.1", port)

    # -- waiting -------------------------------------------------------------

    def wait_for(self, what: str, cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
        """Poll ``cond`` until it returns something truthy; fail with the log tail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result = cond()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}\n--- log tail ---\n{self.log.tail()}"
                )
            time.sleep(interval)

    def wait_event(self, name: str, timeout: float = 10.0, count: int = 1, **fields: Any) -> list[Event]:
        """Wait until at least ``count`` events ``name`` with ``fields`` were logged; return them all."""
        return list(self.wait_for(f"{count} x {name} {fields}", lambda: self._enough(name, count, fields), timeout))

    def _enough(self, name: str, count: int, fields: dict[str, Any]) -> list[Event] | None:
        found = self.log.named(name, **fields)
        return found if len(found) >= count else None

    def wait_exit(self, timeout: float) -> int:
        """Wait for the master to exit; return its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"master still running after {timeout}s\n{self.log.tail()}") from None

    # -- the processes -------------------------------------------------------------

    def workers(self) -> list[psutil.Process]:
        """The master's live worker processes (its children)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):  # it may die while we look
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
        return alive

    def ready_workers(self) -> dict[int, int]:
        """slot -> pid of the workers that logged ``worker_ready`` and are still alive, newest per slot."""
        alive = {p.pid for p in self.workers()}
        out: dict[int, int] = {}
        for event in self.log.named("worker_ready"):
            if event["pid"] in alive:
                out[int(event["worker"])] = int(event["pid"])
        return out

    def wait_workers(self, count: int, timeout: float = 15.0, exclude: frozenset[int] = frozenset()) -> dict[int, int]:
        """Wait until exactly ``count`` live, ready workers (none in ``exclude``) are all the master has."""

        def settled() -> dict[int, int] | None:
            ready = self.ready_workers()
            alive = {p.pid for p in self.workers()}
            pids = set(ready.values())
            ok = len(ready) == count and pids == alive and not (pids & exclude)
            return ready if ok else None

        return dict(self.wait_for(f"{count} ready workers", settled, timeout))

    def rss(self) -> int:
        """Resident memory of the master and all its workers, bytes."""
        total = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            master = psutil.Process(self.pid)
            for proc in [master, *master.children()]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += proc.memory_info().rss
        return total

    def worker_rss(self) -> int:
        total = 0
        for proc in self.workers():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def connections(self) -> int:
        """Established TCP connections the workers hold right now."""
        total = 0
        for proc in self.workers():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += sum(1 for c in proc.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED)
        return total

    @contextlib.contextmanager
    def peak_rss(self, interval: float = 0.05) -> Iterator[list[int]]:
        """Sample :meth:`rss` in a thread while the block runs; the list holds [peak] afterwards."""
        peak = [self.rss()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(interval):
                peak[0] = max(peak[0], self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield peak
        finally:
            done.set()
            thread.join()
            peak[0] = max(peak[0], self.rss())

    def assert_clean_log(self) -> None:
        """Every line is a JSON event and none is an error: no traceback, no crash."""
        self.log.refresh()
        bad = [line for line in self.log.raw if not line.startswith(b"{")]
        assert not bad, b"\n".join(bad[:20]).decode("utf-8", "backslashreplace")
        errors = [e for e in self.log.events if e.get("level") in ("error", "critical")]
        assert not errors, errors[:5]

    def holds(self, client_port: int) -> bool:
        """True when a worker has accepted the connection from ``client_port``."""
        for proc in self.workers():
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(c.raddr and c.raddr.port == client_port for c in proc.net_connections("tcp")):
                    return True
        return False

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the master and wait; SIGKILL it and its workers if they outlive ``timeout``."""
        workers = self.workers()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for worker in workers:  # only processes this server started
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.wait(5)
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        return self.proc.returncode


@contextlib.contextmanager
def open_server(
    env: dict[str, str] | None = None,
    *,
    nofile: int | None = None,
    ready: bool = True,
) -> Iterator[Server]:
    """Start ``python -m app`` with :data:`CHAOS_ENV` plus ``env``; yield it once ``server_ready`` is logged.

    ``nofile`` lowers RLIMIT_NOFILE of the master (and so of its workers)
    before it starts.  The working directory is a fresh temporary one, so no
    ``.env`` file of the checkout leaks in.
    """
    port = free_port()
    full = {**os.environ, **CHAOS_ENV, "PORT": str(port), **(env or {})}
    full.pop("WEB_CONCURRENCY", None)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        log_path = Path(tmp) / "server.log"
        limit = None if nofile is None else (nofile, nofile)

        def lower_limit() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, limit)

        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app", "serve"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full,
                cwd=tmp,
                preexec_fn=lower_limit if limit is not None else None,  # noqa: PLW1509 - before any thread needs it
            )
        server = Server(proc, port, LogFile(log_path), full)
        try:
            if ready:
                server.wait_for(
                    "server_ready",
                    lambda: server.log.named("server_ready") or proc.poll() is not None,
                    START_TIMEOUT,
                )
                assert proc.poll() is None, f"server exited with {proc.returncode}\n{server.log.tail()}"
            yield server
        finally:
            server.stop()
            server.log.refresh()

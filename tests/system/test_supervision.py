"""What can fail around a worker, with real processes and signals: a hung loop, a stalled log reader, recycling.

Each test prints its figures (``-s`` shows them): time to replace a hung
worker, connections its successor answered from the backlog, log lines
dropped and reported.  Only the PIDs these tests started are signalled.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Self

import psutil
import pytest

from app.core import zen
from tests.conformance import recv_exactly
from tests.server import REPO, ServerProcess, free_port, start_server

Q, A = zen.PROBE_QUESTION, zen.PROBE_ANSWER
TIMEOUT = 3  # WORKER_TIMEOUT of these tests, seconds


@dataclass
class Attempt:
    """One connection of a steady load: when it was opened, answered, or how it failed."""

    opened: float
    answered: float | None = None
    error: str | None = None


class SteadyLoad:
    """Fresh connections at a steady rate, one question each, answers awaited concurrently (one thread)."""

    def __init__(self, port: int, rate: float = 40.0, patience: float = 20.0) -> None:
        self.port = port
        self.period = 1.0 / rate
        self.patience = patience
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(self.patience + 5)

    def stop(self) -> list[Attempt]:
        """Stop opening, wait for every answer (or failure), and return the attempts."""
        self.__exit__()
        return self.attempts

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        waiting: dict[socket.socket, tuple[Attempt, bytearray]] = {}
        next_open = time.monotonic()
        while not self._stop.is_set() or waiting:
            now = time.monotonic()
            if not self._stop.is_set() and now >= next_open:
                next_open += self.period
                self._open(sel, waiting, now)
            for key, _ in sel.select(timeout=max(0.0, min(0.01, next_open - now))):
                self._read(waiting, key.fileobj)  # type: ignore[arg-type]
            for sock, (attempt, _) in list(waiting.items()):
                if attempt.answered or attempt.error or now - attempt.opened > self.patience:
                    attempt.error = attempt.error or (None if attempt.answered else "timeout")
                    sel.unregister(sock)
                    del waiting[sock]
                    sock.close()
        sel.close()

    def _open(
        self, sel: selectors.BaseSelector, waiting: dict[socket.socket, tuple[Attempt, bytearray]], now: float
    ) -> None:
        attempt = Attempt(now)
        self.attempts.append(attempt)
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(Q)
        except OSError as exc:
            attempt.error = repr(exc)
            return
        sock.setblocking(False)
        waiting[sock] = (attempt, bytearray())
        sel.register(sock, selectors.EVENT_READ)

    @staticmethod
    def _read(waiting: dict[socket.socket, tuple[Attempt, bytearray]], sock: socket.socket) -> None:
        attempt, got = waiting[sock]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            attempt.error = repr(exc)
            return
        got += data
        if not data:
            attempt.error = f"closed after {bytes(got)!r}"
        elif len(got) >= len(A):
            if got == A:
                attempt.answered = time.monotonic()
            else:
                attempt.error = repr(bytes(got))


def ask(port: int, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(Q)
        return recv_exactly(sock, len(A))


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def no_event(server: ServerProcess, name: str, within: float, start: int = 0) -> bool:
    """True if no event ``name`` shows up within ``within`` seconds (the wait is the test)."""
    try:
        server.wait_event(name, timeout=within, start=start)
    except AssertionError:
        return True
    return False


def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


# -- a hung worker --------------------------------------------------------------------------


def test_a_stopped_worker_is_dumped_killed_and_replaced_and_its_backlog_answered() -> None:
    admin = free_port()
    env = {"WORKERS": "2", "WORKER_TIMEOUT": str(TIMEOUT), "BACKLOG": "1024", "ADMIN_PORT": str(admin)}
    with start_server(env) as server:
        victim = server.worker_pids()[0]
        mark = len(server.events)
        with SteadyLoad(server.port) as load:
            server.wait_event("connection_closed", start=mark)  # the load is flowing
            stopped = time.monotonic()
            os.kill(victim, signal.SIGSTOP)
            landed = time.monotonic()  # from here on nothing enters the victim
            try:
                server.wait_event("worker_ready", lambda e: e["worker"] == 0, timeout=TIMEOUT + 10, start=mark)
                replaced = time.monotonic()
                time.sleep(1)  # the load goes on for a second with the successor
            finally:
                resume(victim)
            attempts = load.stop()
        hung = server.wait_event("worker_hung", start=mark)
        dump = server.wait_event("worker_stack_dump", start=mark)
        # A connection the victim had already accepted when it stopped dies with it: nobody else holds it.
        in_flight = [a for a in attempts if a.answered is None and a.opened < landed]
        failed = [a for a in attempts if a.answered is None and a.opened >= landed]
        # Queued on the stopped worker's socket: opened during the hang, answered only by its successor
        # (the other worker answers within milliseconds).
        backlog = [a for a in attempts if a.answered and a.opened > stopped and a.answered - a.opened > 1]
        waits = sorted(a.answered - a.opened for a in backlog if a.answered)
        fresh = [ask(server.port) for _ in range(20)]
        status, body = get(f"http://127.0.0.1:{admin}/healthz")
        _, exposition = get(f"http://127.0.0.1:{admin}/metrics")
        print(
            f"\nhung worker: replaced {replaced - stopped:.2f} s after SIGSTOP (WORKER_TIMEOUT={TIMEOUT}); "
            f"{len(attempts)} connections, {len(failed)} failed "
            f"({len(in_flight)} lost in flight in the stopped worker); {len(backlog)} answered from its backlog by the "
            f"successor (waited {waits[0]:.2f}..{waits[-1]:.2f} s); silent {hung['silent']} s when declared hung"
        )
        assert hung["pid"] == victim
        assert hung["slot"] == 0
        assert dump["pid"] == victim
        assert "most recent call first" in dump["stack"]
        assert replaced - stopped <= TIMEOUT + 2
        assert not failed, [(a.opened - stopped, a.error) for a in failed]
        assert len(in_flight) <= 2
        assert len(backlog) >= 5
        assert fresh == [A] * 20
        assert status == 200
        assert json.loads(body)["hung"] == {"now": 0, "by_slot": {"0": 1}}
        assert 'zen_workers_hung_total{slot="0"} 1.0' in exposition
        assert 'zen_logs_dropped_total{process="master"} 0.0' in exposition
        assert 'zen_logs_dropped_total{process="worker"} 0.0' in exposition
        assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE


def test_a_worker_stopped_and_resumed_within_the_timeout_is_left_alone() -> None:
    with start_server({"WORKERS": "2", "WORKER_TIMEOUT": "5"}) as server:
        workers = server.worker_pids()
        mark = len(server.events)
        os.kill(workers[0], signal.SIGSTOP)
        try:
            time.sleep(2)  # the pause under test: shorter than WORKER_TIMEOUT
        finally:
            resume(workers[0])
        assert no_event(server, "worker_hung", within=5 + 2, start=mark)
        assert server.worker_pids() == workers
        assert [ask(server.port) for _ in range(20)] == [A] * 20


def flood(port: int, seconds: float, answered: list[int]) -> None:
    """Pipelined questions as fast as the worker answers them, reading every answer, for ``seconds``."""
    block = Q * 2000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        end, unsent = time.monotonic() + seconds, memoryview(block)
        while time.monotonic() < end:
            for _, events in sel.select(timeout=1):
                if events & selectors.EVENT_READ:
                    answered[0] += len(sock.recv(1 << 18))
                if events & selectors.EVENT_WRITE:
                    unsent = unsent[sock.send(unsent) :] or memoryview(block)
        sel.close()


@pytest.mark.slow
def test_a_busy_worker_is_not_a_hung_one() -> None:
    """Pipelined floods keep the workers' loops saturated for 20 s; WORKER_TIMEOUT=3 declares none hung."""
    with start_server({"WORKERS": "2", "WORKER_TIMEOUT": str(TIMEOUT)}) as server:
        workers = server.worker_pids()
        procs = {pid: psutil.Process(pid) for pid in workers.values()}
        before = {pid: sum(p.cpu_times()[:2]) for pid, p in procs.items()}
        counts = [[0] for _ in range(2)]
        threads = [threading.Thread(target=flood, args=(server.port, 20, c)) for c in counts]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        elapsed = time.monotonic() - started
        busiest = max(sum(p.cpu_times()[:2]) - before[pid] for pid, p in procs.items()) / elapsed
        answers = sum(c[0] for c in counts) // len(A)
        print(f"\nflood: {answers} answers in {elapsed:.1f} s, busiest worker at {busiest:.0%} of a core")
        assert not server.find("worker_hung")
        assert server.worker_pids() == workers
        # As much CPU as the host gives it: 2 cores shared with the flooding client (and other jobs).
        assert busiest > 0.4
        assert ask(server.port) == A


# -- a stalled log reader ------------------------------------------------------------------------


def start_unread(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``python -m app`` with stdout a pipe nobody reads yet."""
    return subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=REPO,
        env={**os.environ, "LOG_FORMAT": "json", "WORKERS": "2", **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def read_lines(proc: subprocess.Popen[bytes], lines: list[bytes], pace: tuple[int, float] | None = None) -> None:
    """Read ``proc``'s stdout into ``lines``: all of it, or ``pace`` = (bytes, seconds) at a time."""
    assert proc.stdout is not None
    fd, rest = proc.stdout.fileno(), b""
    while True:
        data = os.read(fd, pace[0] if pace else 1 << 16)
        if not data:
            break
        *whole, rest = (rest + data).split(b"\n")
        lines.extend(whole)
        if pace:
            time.sleep(pace[1])  # the throttled reader
    assert rest == b"", f"a half line at the end: {rest[:80]!r}"


def serve_one_by_one(port: int, count: int) -> list[int]:
    """``count`` connections one after another, each answered; the client ports in order."""
    ports = []
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(Q)
            assert recv_exactly(sock, len(A)) == A
            ports.append(sock.getsockname()[1])
    return ports


def stop(proc: subprocess.Popen[bytes], reader: threading.Thread) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(40) == 0
    reader.join(10)


#: What a worker logs when it stops (worker.Worker._drain), after the connections' lines.
WORKER_STOP_EVENTS = ("worker_draining", "worker_stopped")


def test_an_unread_stdout_stops_nothing_and_every_line_arrives_or_is_counted() -> None:
    port, count = free_port(), 2000
    proc = start_unread({"PORT": str(port), "LOG_BUFFER_BYTES": "4096"})
    lines: list[bytes] = []
    reader = threading.Thread(target=read_lines, args=(proc, lines), daemon=True)
    try:
        started = time.monotonic()
        wait_serving(port)
        serve_one_by_one(port, count)  # answered although nobody reads the log
        served = time.monotonic() - started
        reader.start()
        stop(proc, reader)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    events = [json.loads(line) for line in lines]  # every line whole: no half line, no interleaving
    closed = sum(1 for e in events if e["event"] == "connection_closed")
    drops = [e for e in events if e["event"] == "logs_dropped"]
    dropped = sum(e["dropped"] for e in drops)
    print(
        f"\nunread stdout: {count + 1} connections answered in {served:.1f} s; "
        f"{closed} connection lines arrived, {dropped} dropped and reported in {len(drops)} logs_dropped lines"
    )
    # The reader starts just before the stop: a worker's buffer may still be full when it logs
    # its stop, so those lines can be among the dropped ones (counted in the same reports).
    workers = {e["pid"] for e in events if e["event"] == "worker_ready"}
    seen = {(e.get("pid"), e["event"]) for e in events}
    stop_lines_dropped = sum((pid, name) not in seen for pid in workers for name in WORKER_STOP_EVENTS)
    assert dropped > 0
    assert closed + dropped == count + 1 + stop_lines_dropped  # wait_serving's connection too
    assert {e["pid"] for e in drops} <= {e["pid"] for e in events if e["event"] == "worker_ready"}


def wait_serving(port: int) -> None:
    """Wait until the server answers (a connection waits in the backlog until a worker is ready)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            assert ask(port, timeout=20) == A
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # not bound yet
        else:
            return


def test_a_slow_reader_loses_no_line_while_the_buffer_holds() -> None:
    port, count = free_port(), 1000
    proc = start_unread({"PORT": str(port)})
    lines: list[bytes] = []
    reader = threading.Thread(target=read_lines, args=(proc, lines, (2048, 0.02)), daemon=True)
    reader.start()  # about 100 KB/s: slower than the log while the connections come
    try:
        wait_serving(port)
        ports = serve_one_by_one(port, count)
        stop(proc, reader)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    events = [json.loads(line) for line in lines]
    closed = [e for e in events if e["event"] == "connection_closed"]
    print(f"\nslow reader: {len(lines)} lines, {len(closed)} connection lines, no drop")
    assert not [e for e in events if e["event"] == "logs_dropped"]
    assert len(closed) == count + 1
    for pid in {e["pid"] for e in closed}:  # each process's lines in the order they were logged
        theirs = [int(e["peer"].rsplit(":", 1)[1]) for e in closed if e["pid"] == pid]
        assert [p for p in ports if p in set(theirs)] == [p for p in theirs if p in set(ports)]


# -- recycling ------------------------------------------------------------------------------------


def churn(port: int, until: float, failures: list[str], answered: list[int]) -> None:
    while time.monotonic() < until:
        try:
            got = ask(port, timeout=10)
        except OSError as exc:
            failures.append(repr(exc))
            continue
        if got != A:
            failures.append(repr(got))
        answered[0] += 1


def test_recycling_under_churn_fails_no_question() -> None:
    env = {"WORKERS": "2", "MAX_REQUESTS": "400", "MAX_REQUESTS_JITTER": "100"}
    with start_server(env) as server:
        first = set(server.worker_pids().values())
        failures: list[str] = []
        answered = [0]
        until = time.monotonic() + 6
        threads = [threading.Thread(target=churn, args=(server.port, until, failures, answered)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        recycled = server.find("worker_recycling")
        print(f"\nrecycling: {answered[0]} questions in 6 s, {len(recycled)} workers recycled, {len(failures)} failed")
        assert not failures, failures[:5]
        assert len(recycled) >= 2
        assert {e["pid"] for e in recycled} <= first | {e["pid"] for e in server.find("worker_spawned")}
        assert not first & set(server.worker_pids().values())  # every first worker was replaced
        assert not server.find("worker_respawn_scheduled")  # replaced, not crashed
